"""Speech of any length: frames go to the file as they are made, a live file plays while it grows and after an
interruption, audio and video stay in step to the end, and a terminated run leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import soundfile
import torch

from diffused_heads import generate
from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel
from diffused_heads.media import VideoWriter

from helpers import speech_like, tiny_pipeline


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder


def decoded_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def durations(path):
    """(video end, audio end) in seconds, as the file's header gives them."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video))
        return frames / float(video.average_rate), float(audio.duration * audio.time_base)


def test_generate_writes_each_frame_before_the_next_is_made(tiny_model, tmp_path, monkeypatch):
    events = []
    real_forward, real_write = DiffusedHeadsUNetModel.forward, VideoWriter.write

    def forward(self, *args, **kwargs):
        events.append("unet")
        return real_forward(self, *args, **kwargs)

    def write(self, frame):
        events.append("write")
        return real_write(self, frame)

    monkeypatch.setattr(DiffusedHeadsUNetModel, "forward", forward)
    monkeypatch.setattr(VideoWriter, "write", write)
    soundfile.write(tmp_path / "speech.wav", speech_like(0.3), 16000)
    args = ["--model", tiny_model, "--audio", tmp_path / "speech.wav", "--steps", 2, "--output", tmp_path / "o.mp4"]
    assert generate.main([str(a) for a in args]) == 0
    frames = decoded_frames(tmp_path / "o.mp4")
    assert frames == (4800 + 2560 - 3200) // 640 + 1
    assert events == ["unet", "unet", "write"] * frames


def test_an_interrupted_live_run_leaves_a_playable_file_of_the_frames_made(tiny_model, tmp_path, monkeypatch, capsys):
    real_write = VideoWriter.write
    written = []

    def write(self, frame):
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C while the sixth frame is being written
        written.append(1)
        return real_write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", write)
    soundfile.write(tmp_path / "speech.wav", speech_like(1.0), 16000)
    out = tmp_path / "live.mp4"
    args = ["--model", tiny_model, "--audio", tmp_path / "speech.wav", "--steps", 1, "--output", out, "--live"]
    assert generate.main([str(a) for a in args]) == 130
    err = capsys.readouterr().err
    assert "holds the 5 frames made so far" in err and "the frames made so far are kept" in err
    assert decoded_frames(out) == 5
    video_end, audio_end = durations(out)
    # A fragmented file's audio track keeps the padding of its last AAC packets (1024 samples each).
    assert abs(video_end - 0.2) < 1e-9 and 0 <= audio_end - 0.2 < 0.1
    assert sorted(os.listdir(tmp_path)) == ["live.mp4", "speech.wav"]


def test_without_live_an_interruption_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    real_write = VideoWriter.write

    def write(self, frame):
        if self.frames_written == 3:
            raise KeyboardInterrupt
        return real_write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", write)
    soundfile.write(tmp_path / "speech.wav", speech_like(0.5), 16000)
    args = ["--model", tiny_model, "--audio", tmp_path / "speech.wav", "--steps", 1, "--output", tmp_path / "o.mp4"]
    assert generate.main([str(a) for a in args]) == 130
    assert os.listdir(tmp_path) == ["speech.wav"]


def test_audio_and_video_end_together_after_minutes(tmp_path):
    """Three minutes of frames (tiny ones) with their speech: the last frame ends where the audio track ends,
    and the audio is the speech itself, frame for frame."""
    seconds, rate = 180, 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * np.arange(seconds * rate) / rate)).astype(np.float32)
    frames = seconds * 25
    with VideoWriter(str(tmp_path / "long.mp4"), speech, size=None) as writer:
        for index in range(frames):
            writer.write(np.full((16, 16, 3), (index % 256) / 255.0, np.float32))
    video_end, audio_end = durations(tmp_path / "long.mp4")
    assert video_end == seconds and audio_end == seconds
    with av.open(str(tmp_path / "long.mp4")) as container:
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    # The last second of the decoded track is the last second of the speech (AAC is lossy: a loose match).
    tail = decoded[(seconds - 1) * rate : seconds * rate]
    assert np.corrcoef(tail, speech[-rate:])[0, 1] > 0.99


@pytest.mark.slow
def test_sigterm_during_the_run_leaves_no_partial_file(tiny_model, tmp_path):
    soundfile.write(tmp_path / "speech.wav", speech_like(20.0), 16000)
    command = [sys.executable, "-m", "diffused_heads", "generate", "--model", str(tiny_model)]
    command += ["--audio", str(tmp_path / "speech.wav"), "--steps", "5", "--output", str(tmp_path / "o.mp4")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(name.startswith(".partial-") for name in os.listdir(tmp_path)):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.5)  # some frames into the file
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "interrupted; no output was written" in err
    assert sorted(os.listdir(tmp_path)) == ["speech.wav"]


@pytest.mark.slow
def test_sigterm_during_a_batch_leaves_no_partial_file(tiny_model, tmp_path):
    for k in range(2):
        soundfile.write(tmp_path / f"s{k}.wav", speech_like(20.0, seed=k), 16000)
    from diffused_heads import example_image_path

    rows = "".join(f"{example_image_path()},{tmp_path / f's{k}.wav'}\n" for k in range(2))
    (tmp_path / "jobs.csv").write_text("image,audio\n" + rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "diffused_heads", "generate-batch", "--jobs", str(tmp_path / "jobs.csv")]
    command += ["--output-dir", str(out), "--model", str(tiny_model), "--steps", "5", "--no-prepare"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out.exists() and any(name.startswith(".partial-") for name in os.listdir(out))):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "finished videos are kept, none is half-written" in err
    assert [name for name in os.listdir(out) if not name.startswith(".diffused-heads-progress")] == []


def test_requests_interleaved_on_one_model_each_equal_the_same_request_alone():
    """Two generations at once on one loaded model (the page's --concurrency), each with its own step count:
    while the first is at its first step, the second runs to its end. Each must equal the same call made alone,
    so each needs its own scheduler state (`runtime.with_scheduler(..., own=True)`, as the page asks for)."""
    from diffused_heads import runtime

    shared = tiny_pipeline()
    shared.set_progress_bar_config(disable=True)
    identity = torch.rand(3, 16, 16)
    speech = np.random.default_rng(0).standard_normal(640 * 4).astype(np.float32) * 0.1

    def request(steps, callback=None):
        pipe = runtime.with_scheduler(shared, None, own=True)
        kwargs = {"callback_on_step_end": callback} if callback else {}
        return pipe(identity, speech, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)

    alone_3, alone_6 = request(3).frames[0], request(6).frames[0]
    inner = {}

    def run_the_other_meanwhile(pipeline, step, timestep, callback_kwargs):
        if not inner:
            inner["frames"] = request(6).frames[0]
        return callback_kwargs

    outer = request(3, run_the_other_meanwhile).frames[0]
    np.testing.assert_array_equal(inner["frames"], alone_6)
    np.testing.assert_array_equal(outer, alone_3)
