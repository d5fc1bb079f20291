"""`diffused-heads evaluate`: one setting, and a sweep of samplers and step counts with its table and plot."""

import csv
import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffused_heads import evaluate, evaluation, make_dataset

from helpers import tiny_pipeline


@pytest.fixture(scope="module")
def eval_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    args = ["--output", str(folder), "--num-clips", "2", "--split", "eval", "--size", "16", "--max-seconds", "1.0"]
    assert make_dataset.main(args + ["--speech", "synthetic"]) == 0
    model = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(model)
    return folder, model


def test_a_sweep_writes_a_row_per_sampler_and_step_count_and_a_plot(eval_clips, tmp_path, capsys):
    data, model = eval_clips
    args = ["--model", str(model), "--data", str(data), "--schedulers", "ddpm,ddim", "--steps", "1,3"]
    assert evaluate.main(args + ["--output-dir", str(tmp_path), "--dtype", "float32"]) == 0
    with open(tmp_path / "sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scheduler"], int(r["steps"])) for r in rows] == [("ddpm", 1), ("ddpm", 3), ("ddim", 1), ("ddim", 3)]
    seconds = {(r["scheduler"], int(r["steps"])): float(r["seconds_per_frame"]) for r in rows}
    assert all(s > 0 for s in seconds.values())
    assert seconds[("ddpm", 3)] > seconds[("ddpm", 1)]  # three UNet calls a frame cost more than one
    assert all(int(r["clips"]) == 2 for r in rows)
    # The ground truth's figures do not depend on the sampler.
    assert len({r["r_gt_env"] for r in rows}) == 1 and len({r["psnr_id_gt"] for r in rows}) == 1
    picture = PIL.Image.open(tmp_path / "sweep.png")
    assert picture.size[0] > 1000 and np.asarray(picture.convert("L")).std() > 10
    assert "Wrote" in capsys.readouterr().out


def test_a_sweep_needs_an_output_folder_and_known_samplers(eval_clips, capsys):
    data, model = eval_clips
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(model), "--data", str(data), "--schedulers", "ddpm,warp"])
    assert "unknown ['warp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(model), "--data", str(data), "--steps", "1,2"])
    assert "--output-dir" in capsys.readouterr().err


def test_one_setting_prints_its_summary(eval_clips, capsys):
    data, model = eval_clips
    assert evaluate.main(["--model", str(model), "--data", str(data), "--steps", "2", "--scheduler", "ddim"]) == 0
    out = capsys.readouterr().out
    assert "2 clips" in out and "DDIMScheduler" in out and "2 steps" in out


def test_the_summary_has_95_percent_intervals_and_several_models_are_measured_alike(eval_clips, tmp_path, capsys):
    data, model = eval_clips
    student = tmp_path / "student"
    pipe = tiny_pipeline()
    pipe.register_to_config(num_inference_steps=1)
    pipe.save_pretrained(student)
    report = tmp_path / "report.json"
    arguments = ["--model", str(model), "--model", str(student), "--data", str(data), "--json", str(report)]
    assert evaluate.main(arguments + ["--steps", "2"]) == 0  # the first model's; the student runs at its own
    out = capsys.readouterr().out
    assert out.count("mean ± 95% interval") == 2 and "student: 2 clips" in out and "1 steps" in out
    with open(report, encoding="utf-8") as f:
        results = json.load(f)["models"]
    assert [(r["model"], r["steps"]) for r in results] == [("model0", 2), ("student", 1)]
    for result in results:
        summary, clips = result["summary"], result["clips"]
        for key in evaluation.DRAWN_KEYS:
            values = [c[key] for c in clips]
            assert summary[key] == pytest.approx(np.mean(values))
            # Student's t with one degree of freedom: 12.706 times the standard error.
            assert summary[key + "_ci95"] == pytest.approx(12.706 * np.std(values, ddof=1) / np.sqrt(2), rel=1e-3)


def test_a_further_model_joins_the_sweep_at_its_own_steps(eval_clips, tmp_path):
    data, model = eval_clips
    student = tmp_path / "student"
    pipe = tiny_pipeline()
    pipe.register_to_config(num_inference_steps=2)
    pipe.save_pretrained(student)
    arguments = ["--model", str(model), "--model", str(student), "--data", str(data), "--steps", "1,3"]
    assert evaluate.main(arguments + ["--schedulers", "ddim", "--output-dir", str(tmp_path / "sweep")]) == 0
    with open(tmp_path / "sweep" / "sweep.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scheduler"], int(r["steps"])) for r in rows] == [("ddim", 1), ("ddim", 3), ("student", 2)]
    assert all(float(r["psnr_id_gen_ci95"]) > 0 for r in rows)


def test_drawn_clips_are_generated_on_the_device_asked_for(eval_clips, capsys, monkeypatch):
    data, model = eval_clips
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate.main(["--model", str(model), "--data", str(data), "--device", "cuda"]) == 1
    assert "cuda was asked for but no CUDA GPU is available" in capsys.readouterr().err

    # Where there is one, the models are loaded on it.
    from diffused_heads import runtime

    loaded = []

    class Stop(Exception):
        pass

    def load_pipeline(model, device, *args, **kwargs):
        loaded.append(device)
        raise Stop

    monkeypatch.setattr(runtime, "resolve_device", lambda name: torch.device("cuda" if name == "cuda" else "cpu"))
    monkeypatch.setattr(runtime, "load_pipeline", load_pipeline)
    with pytest.raises(Stop):
        evaluate.main(["--model", str(model), "--data", str(data), "--device", "cuda"])
    assert loaded == [torch.device("cuda")]
