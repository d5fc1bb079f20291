"""The synthetic talking-face data: the mouth follows the speech, and the evaluation measure sees it."""

import json

import numpy as np
import soundfile

from diffused_heads import make_dataset
from diffused_heads import synthetic_data as data
from diffused_heads.measures import drawn_mouth_opening, pearson


def test_envelope_is_zero_in_silence_and_high_in_speech():
    rng = np.random.default_rng(0)
    waveform = np.zeros(16000, np.float32)
    waveform[6400:9600] = 0.5 * rng.standard_normal(3200)
    envelope = data.speech_envelope(waveform)
    assert len(envelope) == 25
    assert envelope[:8].max() == 0 and envelope[-8:].max() == 0
    assert envelope[11:14].min() > 0.9


def test_clip_mouth_follows_speech_and_measure_sees_it():
    rng = np.random.default_rng(3)
    frames, waveform, info = data.make_clip(rng, 64, data.TRAIN_VOICES, use_espeak=False, max_seconds=3.0)
    count = info["num_frames"]
    assert frames.shape == (count, 64, 64, 3) and frames.dtype == np.uint8
    assert len(waveform) == count * data.SAMPLES_PER_FRAME
    opening = np.array(info["mouth_opening"])
    envelope = data.speech_envelope(waveform, count)
    assert opening.min() == 0 and opening.max() > 0.8
    assert pearson(opening, envelope) > 0.8
    boxes = np.array(info["mouth_boxes"])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    region = (boxes[:, 0].min() - 3, boxes[:, 1].min() - 3, boxes[:, 2].max() + 3, boxes[:, 3].max() + 3)
    measured = drawn_mouth_opening(frames / 255.0, tuple(int(v) for v in region))
    assert pearson(measured, opening) > 0.95
    # The background is the green of the original training data.
    assert tuple(frames[0, 0, 0]) == data.GREEN


def test_blinks_and_head_motion():
    rng = np.random.default_rng(0)
    eyes = data.blink_track(rng, 250)
    assert 2 <= int((eyes == 0).sum() // 2) <= 8
    head = data.head_track(rng, 250)
    assert 0 < np.abs(head).max() <= 0.02 + 1e-9
    assert np.abs(np.diff(head, axis=0)).max() < 0.005  # smooth


def test_eval_split_uses_other_voices_and_identities(tmp_path):
    assert not set(data.TRAIN_VOICES) & set(data.EVAL_VOICES)
    for split in ("train", "eval"):
        args = ["--output", str(tmp_path / split), "--num-clips", "1", "--size", "32", "--max-seconds", "1.2"]
        assert make_dataset.main([*args, "--split", split, "--speech", "synthetic"]) == 0
    train_info = json.loads((tmp_path / "train" / "train_00000.json").read_text())
    eval_info = json.loads((tmp_path / "eval" / "eval_00000.json").read_text())
    assert train_info["style"] != eval_info["style"]
    waveform, rate = soundfile.read(tmp_path / "eval" / "eval_00000.wav")
    assert rate == 16000 and len(waveform) == eval_info["num_frames"] * 640
    assert (tmp_path / "eval" / "eval_00000.mp4").stat().st_size > 0


def test_bad_arguments(capsys, tmp_path):
    assert make_dataset.main(["--output", str(tmp_path), "--size", "15"]) == 1
    assert "error:" in capsys.readouterr().err
