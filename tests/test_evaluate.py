"""`diffused-heads evaluate`: one setting, and a sweep of samplers and step counts with its table and plot."""

import csv

import numpy as np
import PIL.Image
import pytest

from diffused_heads import evaluate, make_dataset

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
