"""The measures of real clips, each against a case with a known answer: clips made from a real photo whose
mouth opens with the speech and whose eyes blink on command, moving a little."""

import json

import numpy as np
import pytest

from diffused_heads import dataset, evaluate, evaluation, measures

from talking_videos import speech_with_envelope, talking_photo

FRAMES = 75


def envelope(seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.convolve(rng.random(FRAMES + 6), np.ones(4) / 4, "valid")[:FRAMES]
    return np.clip(smooth * 1.6 - 0.4, 0.0, 1.0)


def blinking(at=(20, 50)):
    shut = np.zeros(FRAMES)
    for start in at:
        shut[start : start + 3] = (0.6, 1.0, 0.6)
    return shut


@pytest.fixture(scope="module")
def talking():
    """A talking, blinking clip: frames, landmarks, speech."""
    opening = envelope()
    frames = talking_photo(opening, blinking())
    return frames, measures.clip_landmarks(frames), speech_with_envelope(opening)


def shifted(frames, k):
    """The clip with its pictures k frames late (the first picture held)."""
    return np.concatenate([np.repeat(frames[:1], k, axis=0), frames[: len(frames) - k]])


def test_a_clip_against_itself_scores_perfectly(talking):
    frames, points, _ = talking
    scores = measures.compared_measures(frames, points, frames, points)
    assert scores["lmd_px"] == 0.0
    assert scores["psnr"] == scores["psnr_outside_mouth"] == 100.0
    assert scores["ssim"] == pytest.approx(1.0) and scores["ssim_outside_mouth"] == pytest.approx(1.0)


def test_the_mouth_follows_the_speech_and_the_offset_finds_a_shift(talking):
    frames, points, speech = talking
    own = measures.clip_measures(frames, points, speech)
    assert own["face_found"] == 1.0
    assert own["sync_r"] > 0.4 and own["sync_offset"] == 0
    for k in (2, -3):
        moved = shifted(frames, k) if k > 0 else np.concatenate([frames[-k:], np.repeat(frames[-1:], -k, axis=0)])
        found = measures.clip_measures(moved, measures.clip_landmarks(moved), speech)
        assert found["sync_offset"] == k, (k, found)
        assert found["sync_r"] < own["sync_r"] - 0.2  # at offset 0 the shifted clip is out of sync


def test_a_frozen_mouth_has_no_sync(talking):
    _, _, speech = talking
    frozen = talking_photo(np.full(FRAMES, 0.5), blinking())
    scores = measures.clip_measures(frozen, measures.clip_landmarks(frozen), speech)
    assert abs(scores["sync_r"]) < 0.2, scores


def test_blinks_are_counted_and_open_eyes_have_none(talking):
    frames, points, speech = talking
    rate, length = measures.blinks(measures.eye_aspect_ratio(points))
    assert rate == pytest.approx(2 / 3.0)  # two blinks in 3 s
    assert 0.02 < length <= 0.12  # of one to three frames
    open_eyes = talking_photo(envelope(), np.zeros(FRAMES))
    assert measures.blinks(measures.eye_aspect_ratio(measures.clip_landmarks(open_eyes))) == (0.0, 0.0)


def test_noise_lowers_psnr_by_the_expected_amount(talking):
    frames = talking[0].astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    for sigma in (0.01, 0.05):
        noisy = frames + rng.normal(0.0, sigma, frames.shape)  # not clipped: the expected value is exact
        assert measures.psnr(noisy, frames) == pytest.approx(-20 * np.log10(sigma), abs=0.05)
    assert measures.ssim(frames + rng.normal(0.0, 0.05, frames.shape), frames) < 0.9


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((1, 40, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    luma = np.array([0.299, 0.587, 0.114])
    expected = structural_similarity(
        a[0] @ luma,
        b[0] @ luma,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )[1][5:-5, 5:-5].mean()
    assert measures.ssim(b, a) == pytest.approx(expected, abs=1e-9)


def test_mean_and_interval():
    mean, half = measures.mean_and_interval([1.0, 2.0, 3.0, float("nan")])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / np.sqrt(3))


# --------------------------------------------------------------------------------------------------
# The command on a prepared dataset


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, talking):
    folder = tmp_path_factory.mktemp("prepared")
    frames, _, speech = talking
    clips = []
    for number, clip in enumerate((frames, talking_photo(envelope(1), blinking((10, 40)), face="hopper"))):
        name = f"clip{number}"
        writer = dataset.ClipWriter(str(folder), name, FRAMES, 128)
        for frame in clip:
            writer.write_frame(frame)
        writer.close(speech if number == 0 else speech_with_envelope(envelope(1), seed=1))
        clips.append({"id": name, "frames": FRAMES, "speaker": name, "split": "test"})
    dataset.write_manifest(str(folder), 128, clips, [])
    return folder


def given_clips(prepared, folder, change=lambda frames: frames):
    folder.mkdir()
    data = dataset.PreparedDataset(str(prepared))
    for clip in data.clips:
        np.save(folder / f"{clip.id}.npy", change(data.frames(clip)))
    return folder


def test_evaluate_measures_given_clips_and_compares_result_folders(prepared, tmp_path, capsys):
    same = given_clips(prepared, tmp_path / "same")
    late = given_clips(prepared, tmp_path / "late", lambda frames: shifted(frames, 3))
    for name, clips in (("eval-same", same), ("eval-late", late)):
        arguments = ["--data", str(prepared), "--generated", str(clips), "--output-dir", str(tmp_path / name)]
        assert evaluate.main(arguments) == 0
    same_summary = json.loads((tmp_path / "eval-same" / "summary.json").read_text())["measures"]
    late_summary = json.loads((tmp_path / "eval-late" / "summary.json").read_text())["measures"]
    # The ground truth against itself: perfect scores, and its own measures equal the ground truth's.
    assert same_summary["gen_lmd_px"][0] == 0.0 and same_summary["gen_psnr"][0] == 100.0
    for name in evaluation.OWN_MEASURES:
        assert same_summary[f"gen_{name}"][0] == pytest.approx(same_summary[f"gt_{name}"][0], nan_ok=True)
    assert same_summary["gen_blinks_per_s"][0] == pytest.approx(2 / 3.0)
    # Pictures 3 frames late: the offset finds it on every clip.
    assert late_summary["gen_sync_offset"] == [3.0, 0.0]
    rows = (tmp_path / "eval-late" / "clips.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("clip,frames,gen_sync_r")
    per_frame = (tmp_path / "eval-late" / "clips" / "clip0.csv").read_text().splitlines()
    assert len(per_frame) == FRAMES + 1
    capsys.readouterr()
    assert evaluate.main(["--compare", str(tmp_path / "eval-same"), str(tmp_path / "eval-late")]) == 0
    table = capsys.readouterr().out
    assert "gen_sync_offset" in table and "+3.000" in table


def test_evaluate_regenerates_the_test_split_and_resumes(prepared, tmp_path, capsys):
    from helpers import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    arguments = ["--data", str(prepared), "--model", str(model), "--steps", "2", "--output-dir", str(tmp_path / "r")]
    assert evaluate.main(arguments + ["--num-clips", "1"]) == 0
    made = tmp_path / "r" / "generated" / "clip0.npy"
    stamp = made.stat().st_mtime_ns
    assert np.load(made).shape == (FRAMES, 16, 16, 3)  # at the model's size
    assert evaluate.main(arguments) == 0  # the second clip is added, the first kept
    assert made.stat().st_mtime_ns == stamp
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["clips"] == 2 and summary["seconds_per_frame"] > 0


def test_a_sampler_sweep_on_real_clips_writes_its_table_and_plot(prepared, tmp_path):
    from helpers import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    arguments = ["--data", str(prepared), "--model", str(model), "--num-clips", "1", "--output-dir", str(tmp_path)]
    assert evaluate.main(arguments + ["--schedulers", "ddpm,ddim", "--steps", "1,2"]) == 0
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("scheduler,steps,gen_sync_r")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep" / "ddim-2" / "summary.json").is_file()


@pytest.mark.slow
def test_evaluate_spreads_over_two_processes_with_the_figures_of_one(prepared, tmp_path):
    import socket
    import subprocess

    clips = given_clips(prepared, tmp_path / "given", lambda frames: shifted(frames, 2))
    arguments = ["--data", str(prepared), "--generated", str(clips)]
    assert evaluate.main(arguments + ["--output-dir", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)]
    command += ["-m", "diffused_heads", "evaluate", *arguments, "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Wrote") == 1  # one summary, from the main process
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["measures"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["measures"]
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-9, err_msg=key)


def test_psnr_outside_the_mouth_leaves_the_mouth_out(talking):
    """Frames that differ from the reference only inside the mouth box: perfect outside it, not over the frame."""
    frames, points, _ = talking
    inside = measures.mouth_masks(points, frames.shape[1])
    assert 0.01 < inside.mean() < 0.3
    changed = frames.copy()
    changed[inside] = 255 - changed[inside]
    scores = measures.compared_measures(changed, points, frames, points)
    assert scores["psnr_outside_mouth"] == 100.0
    assert scores["psnr"] < 25.0
    assert measures.psnr(changed, frames, ~inside) == 100.0 and measures.psnr(changed, frames) < 25.0
    # One (H, W) mask for every frame, as for drawn clips.
    region = (10, 20, 40, 50)
    one = frames[:1].copy()
    one[0, 20:50, 10:40] = 0
    outside = measures.outside_region(frames.shape[1], region)
    assert measures.psnr(one, frames[:1], outside) == 100.0 and measures.psnr(one, frames[:1]) < 25.0
