"""Every option lands where it should: checked at the pipeline call it reaches (the pipeline, its scheduler, its
precision, the threads, the inputs), not at the parser."""

import json

import av
import numpy as np
import PIL.Image
import pytest
import soundfile
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from diffused_heads import batch, example_image_path, generate, media, runtime, serving

from helpers import speech_like, tiny_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)  # a model without defaults of its own, as a converted one
    return folder


def cli(*args):
    return generate.main([str(a) for a in args])


def test_generate_uses_the_models_steps_and_else_the_released_100(tiny_model, tmp_path, stream_calls):
    soundfile.write(tmp_path / "s.wav", speech_like(0.04), 16000)  # one frame
    assert cli("--model", tiny_model, "--audio", tmp_path / "s.wav", "--output", tmp_path / "a.mp4") == 0
    assert stream_calls[-1]["num_inference_steps"] == 100
    assert cli("--audio", tmp_path / "s.wav", "--output", tmp_path / "b.mp4") == 0  # the built-in student: its own 2
    assert stream_calls[-1]["num_inference_steps"] == 2
    assert cli("--model", "builtin-ddpm", "--audio", tmp_path / "s.wav", "--output", tmp_path / "c.mp4") == 0
    assert stream_calls[-1]["num_inference_steps"] == 10


def test_generate_scheduler_dtype_and_threads_reach_the_pipeline(tiny_model, tmp_path, stream_calls):
    soundfile.write(tmp_path / "s.wav", speech_like(0.04), 16000)
    common = ("--model", tiny_model, "--audio", tmp_path / "s.wav", "--steps", 2)
    assert (
        cli(*common, "--output", tmp_path / "a.mp4", "--scheduler", "ddim", "--threads", 1, "--dtype", "float32") == 0
    )
    assert cli(*common, "--output", tmp_path / "b.mp4", "--dtype", "bfloat16", "--threads", 2) == 0
    assert cli(*common, "--output", tmp_path / "c.mp4") == 0
    ddim, half, plain = stream_calls
    assert isinstance(ddim["scheduler"], DDIMScheduler) and ddim["scheduler"].config.timestep_spacing == "trailing"
    assert type(plain["scheduler"]) is DDPMScheduler
    assert (ddim["unet_dtype"], half["unet_dtype"]) == (torch.float32, torch.bfloat16)
    native = runtime.native_bfloat16(torch.device("cpu"))  # the default, "auto"
    assert plain["unet_dtype"] == (torch.bfloat16 if native else torch.float32)
    assert (ddim["threads"], half["threads"]) == (1, 2)


def test_auto_precision_is_bfloat16_where_the_device_computes_it(monkeypatch):
    from helpers import logged

    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(runtime, "native_bfloat16", lambda device, native=native: native)
        with logged() as messages:
            assert runtime.resolve_dtype("auto", cpu) == expected
        assert len(messages) == 1 and str(expected).split(".")[1] in messages[0]  # said, with the reason
    with logged() as messages:
        assert runtime.resolve_dtype("float32", cpu) == torch.float32
    assert messages == []  # (asked for by name: nothing to say)
    assert runtime.resolve_dtype("float32", cpu) == torch.float32


def test_generate_takes_the_part_of_the_audio_file_asked_for(tiny_model, tmp_path, stream_calls):
    rate = 22050
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(2 * rate) / rate) * np.linspace(0, 1, 2 * rate)).astype(
        np.float32
    )
    soundfile.write(tmp_path / "s.wav", tone, rate)
    args = ("--model", tiny_model, "--audio", tmp_path / "s.wav", "--steps", 1, "--output", tmp_path / "o.mp4")
    assert cli(*args, "--start", 0.5, "--duration", 0.25) == 0
    expected = media.load_audio(str(tmp_path / "s.wav"), start=0.5, duration=0.25)
    np.testing.assert_array_equal(stream_calls[-1]["audio"], expected)
    whole = media.load_audio(str(tmp_path / "s.wav"))
    assert len(expected) == 4000 and np.abs(expected - whole[8000:12000]).max() < 0.02  # that part, resampled


def test_generate_takes_the_frame_of_a_video_asked_for(tiny_model, tmp_path, stream_calls):
    frames = np.stack([np.full((32, 32, 3), 20 * k, np.uint8) for k in range(8)])
    media.export_to_video_with_audio(frames, speech_like(0.32), str(tmp_path / "clip.mp4"), size=None)
    common = ("--model", tiny_model, "--image", tmp_path / "clip.mp4", "--no-prepare", "--steps", 1)
    common += ("--audio", tmp_path / "clip.mp4", "--duration", 0.04)
    assert cli(*common, "--output", tmp_path / "a.mp4", "--frame", 5) == 0
    assert cli(*common, "--output", tmp_path / "b.mp4", "--random-frame", "--seed", 3) == 0
    drawn = media.random_frame_index(str(tmp_path / "clip.mp4"), 3)
    for call, index in zip(stream_calls, (5, drawn)):
        level = np.asarray(call["identity"], np.float32).mean()
        assert abs(level - 20 * index) < 4, (index, level)  # that frame's grey (through H.264)


def decoded(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_generate_batch_gives_each_job_its_seed_and_steps(tiny_model, tmp_path, stream_calls):
    for k in range(3):
        PIL.Image.new("RGB", (20, 20), (40 * k, 90, 120)).save(tmp_path / f"f{k}.png")
        soundfile.write(tmp_path / f"s{k}.wav", speech_like(0.04, seed=k), 16000)
    rows = [
        {"image": "f0.png", "audio": "s0.wav", "seed": 11},
        {"image": "f1.png", "audio": "s1.wav", "seed": 12, "steps": 3},
        {"image": "f2.png", "audio": "s2.wav"},
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    args = ["--jobs", tmp_path / "jobs.jsonl", "--output-dir", tmp_path / "out", "--model", tiny_model]
    args += ["--steps", "2", "--seed", "5", "--batch-size", "4", "--no-prepare", "--threads", "1"]
    assert batch.main([str(a) for a in args]) == 0
    seen = {}
    for call in stream_calls:
        for generator in call["generator"]:
            seen[generator.initial_seed()] = call["num_inference_steps"]
    assert seen == {11: 2, 12: 3, 5: 2}


def test_the_page_honours_each_request(tiny_model, tmp_path, stream_calls):
    soundfile.write(tmp_path / "s.wav", speech_like(0.12), 16000)
    models = serving.Models([None, str(tiny_model)])
    face = example_image_path()

    def request(model, scheduler, seed, stabilize="the model's own", image=face):
        outputs = list(
            serving.run_request(
                models,
                image,
                str(tmp_path / "s.wav"),
                model,
                2,
                scheduler,
                seed,
                stabilize,
                False,
                serving.Limits(),
                str(tmp_path),
            )
        )
        return outputs[-1][0]

    first = request(serving.BUILTIN_LABEL, "ddim", 1)
    request(tiny_model.name, "the model's own", 2, stabilize="5")
    request(serving.BUILTIN_LABEL, "the model's own", 3)
    builtin, tiny, again = stream_calls
    assert builtin["unet"] is again["unet"] and tiny["unet"] is not builtin["unet"]  # the request's model
    assert isinstance(builtin["scheduler"], DDIMScheduler)
    # A request's sampler does not stick to the model: the next one gets the model's own (the default built-in
    # model is the 2-step student, sampled by LCMScheduler).
    assert type(again["scheduler"]) is LCMScheduler
    assert [c["generator"].initial_seed() for c in stream_calls] == [1, 2, 3]
    assert [c["stabilize_every"] for c in stream_calls] == [None, 5, None]
    assert decoded(first).shape[0] == 3
    with pytest.raises(ValueError, match="add a face photo"):
        request(serving.BUILTIN_LABEL, "the model's own", 0, image=None)
    with pytest.raises(ValueError, match="this page offers the models"):
        request("/etc", "the model's own", 0)


def test_the_commands_lists_of_choices_are_the_librarys_own():
    """`cli_utils` repeats these lists so that --help answers without importing torch or the faces extra; they
    must stay the lists the library accepts."""
    from diffused_heads import cli_utils, faces

    assert cli_utils.SCHEDULER_CHOICES == runtime.SCHEDULERS
    assert set(cli_utils.DTYPE_CHOICES) == {"auto", *runtime.DTYPES}
    assert cli_utils.SEGMENTER_CHOICES == faces.SEGMENTERS


def test_compile_compiles_the_unet_in_place(tiny_model):
    """`--compile` (runtime.load_pipeline): the pipeline keeps its own UNet object, compiled in place by
    `nn.Module.compile`, not a `torch.compile` wrapper put in its place."""
    from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel

    plain = runtime.load_pipeline(str(tiny_model), "cpu", "float32")
    compiled = runtime.load_pipeline(str(tiny_model), "cpu", "float32", compile=True)
    assert type(compiled.unet) is DiffusedHeadsUNetModel and plain.unet._compiled_call_impl is None
    assert compiled.unet._compiled_call_impl is not None
