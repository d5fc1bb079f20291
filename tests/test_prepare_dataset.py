"""prepare-dataset on talking videos made at test time from real photos: alignment that holds the head still,
the parts left out and why, the manifest and its speaker split, resuming, two processes, and fine-tuning a
tiny model on the result."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from diffused_heads import dataset, prepare_dataset, train, training
from diffused_heads.faces import MESH_INDICES, FaceModels, face_mesh, fill_missing, landmark_speed
from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline

from helpers import free_port, speech_like, tiny_pipeline
from talking_videos import busy_background, frame_at, talking_video, write_video

SIZE = 64


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Two speakers in folders, one video at the top, and videos that cannot be used."""
    folder = tmp_path_factory.mktemp("raw")
    (folder / "anna").mkdir()
    (folder / "grace").mkdir()
    talking_video(str(folder / "anna" / "moving.mp4"), "astronaut", seconds=2.0, fps=30)
    talking_video(str(folder / "anna" / "cut.mp4"), "astronaut", seconds=3.0, fps=25, cut_to="hopper", cut_at=0.5)
    # Another container, frame rate, picture size, sample rate and channel count.
    talking_video(
        str(folder / "grace" / "talk.mov"), "hopper", 2.0, fps=24, size=(300, 260), audio_rate=22050, channels=1
    )
    talking_video(str(folder / "pair.mp4"), "astronaut", seconds=2.0, second="hopper")
    talking_video(str(folder / "quiet.mp4"), "hopper", seconds=1.5, silent=True)
    talking_video(str(folder / "short.mp4"), "hopper", seconds=0.6)
    empty = [np.asarray(busy_background(240, 180, seed=k)) for k in range(30)]
    write_video(
        str(folder / "nobody.mp4"),
        empty,
        fps=25,
        audio=np.asarray(np.random.default_rng(0).normal(0, 0.1, 19200), np.float32),
    )
    # The face leaves the picture for 0.4 s (more than --max-gap frames) in the middle.
    faces = [frame_at(k / 25, "hopper") for k in range(65)]
    empty_middle = [np.asarray(busy_background(320, 240, seed=0))] * 10
    audio = speech_like(2.6, seed=5)
    write_video(str(folder / "grace" / "away.mp4"), faces[:30] + empty_middle + faces[40:], fps=25, audio=audio)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing")
    (folder / "notes.txt").write_text("not a video")
    return folder


def prepare(raw, output, *extra):
    return prepare_dataset.main([str(raw), str(output), "--size", str(SIZE), *extra])


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared") / "data"
    assert prepare(raw, output, "--test-fraction", "0.5") == 0
    return output


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_usable_videos_become_clips_and_the_rest_is_left_out_with_a_reason(prepared):
    content = manifest(prepared)
    sources = {c["source"]: c for c in content["clips"]}
    assert set(sources) == {"anna/moving.mp4", "anna/cut.mp4", "grace/talk.mov", "grace/away.mp4"}
    reasons = {d["source"]: d["reason"] for d in content["dropped"]}
    assert reasons["pair.mp4"].startswith("several faces")
    assert reasons["quiet.mp4"].startswith("silent")
    assert reasons["short.mp4"].startswith("too short")
    assert reasons["nobody.mp4"].startswith("no face")
    assert reasons["broken.mp4"].startswith("unreadable")
    assert "notes.txt" not in reasons
    assert content["summary"]["dropped_by_reason"] == {
        "no face": 1,
        "several faces": 1,
        "silent": 1,
        "too short": 1,
        "unreadable": 1,
    }


def test_the_scene_cut_splits_a_video_in_two_clips(prepared):
    cut = [c for c in manifest(prepared)["clips"] if c["source"] == "anna/cut.mp4"]
    assert [c["start_frame"] for c in cut] == [0, 38]  # the cut is at half of 75 frames
    assert [c["frames"] for c in cut] == [38, 37]


def test_a_face_missing_for_longer_than_the_gap_splits_the_video(prepared):
    away = [c for c in manifest(prepared)["clips"] if c["source"] == "grace/away.mp4"]
    assert [(c["start_frame"], c["frames"]) for c in away] == [(0, 30), (40, 25)]


def test_every_clip_is_25_fps_with_640_samples_per_frame_and_mouth_boxes(prepared):
    data = dataset.PreparedDataset(str(prepared))
    assert data.size == SIZE
    lengths = {c.source: c.frames for c in data.clips}
    assert lengths["anna/moving.mp4"] == 50  # 2 s at 30 fps become 2 s at 25 fps
    assert lengths["grace/talk.mov"] == 50  # and so do 2 s at 24 fps
    for clip in data.clips:
        data.check(clip)  # shapes and dtypes as the manifest says
        audio = data.audio(clip)
        assert len(audio) == 640 * clip.frames and np.abs(audio).max() > 0.01
        boxes = data.mouth_boxes(clip)
        # The mouth is in the lower middle of an aligned face.
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / SIZE
        assert np.all(np.abs(centre[:, 0] - 0.5) < 0.1) and np.all((centre[:, 1] > 0.6) & (centre[:, 1] < 0.9))


def test_speakers_are_split_whole_with_a_fixed_seed(raw, prepared, tmp_path):
    clips = manifest(prepared)["clips"]
    splits = {}
    for clip in clips:
        splits.setdefault(clip["speaker"], set()).add(clip["split"])
    assert splits.keys() == {"anna", "grace"}
    assert all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "test"}
    again = [{"speaker": c["speaker"]} for c in clips]
    dataset.assign_splits(again, 0.5, seed=0)
    assert [c["split"] for c in again] == [c["split"] for c in clips]


def test_the_aligned_head_holds_still_while_the_video_moves(prepared):
    data = dataset.PreparedDataset(str(prepared))
    models = FaceModels.shared()
    for clip in data.clips:
        # Landmarks found again in the written frames, independently of the preparation's own figures.
        found = []
        for frame in data.iter_frames(clip):
            points = face_mesh(models, np.ascontiguousarray(frame), (0, 0, SIZE, SIZE))
            found.append(np.full((5, 2), np.nan) if points is None else points[list(MESH_INDICES)])
        still = landmark_speed(fill_missing(np.stack(found)))
        moving = clip.extra["jitter_in_px"]
        assert moving > 1.0, clip.id  # the head moves in the video ...
        assert still < 0.3 * moving, (clip.id, still, moving)  # ... and hardly in the aligned frames
        assert abs(still - clip.extra["jitter_out_px"]) < 0.1


def test_green_background_by_default(prepared):
    data = dataset.PreparedDataset(str(prepared))
    frame = data.frame(data.clips[0], 10).astype(float)
    corners = np.concatenate([frame[:4, :4].reshape(-1, 3), frame[:4, -4:].reshape(-1, 3)])
    assert np.abs(corners - (0, 177, 64)).max(axis=1).mean() < 30


def test_a_run_resumes_where_it_stopped(raw, tmp_path, capsys):
    source = tmp_path / "raw"
    (source / "anna").mkdir(parents=True)
    shutil.copy(raw / "anna" / "moving.mp4", source / "anna")
    shutil.copy(raw / "grace" / "talk.mov", source / "talk.mov")
    output = tmp_path / "data"
    assert prepare(source, output) == 0
    first = manifest(output)
    written = output / "clips" / "anna__moving" / "frames.npy"
    stamp = written.stat().st_mtime_ns
    # One video's work is lost (its record and clip), as after an interruption.
    shutil.rmtree(output / "clips" / "talk")
    for record in (output / "records").iterdir():
        if json.loads(record.read_text())["source"] == "talk.mov":
            record.unlink()
    capsys.readouterr()
    assert prepare(source, output) == 0
    assert "1 of 2 videos were prepared before: skipped" in capsys.readouterr().err
    assert written.stat().st_mtime_ns == stamp
    assert manifest(output)["clips"] == first["clips"]
    # Other options in the same folder are refused.
    assert prepare(source, output, "--smoothing", "0") == 1
    assert "prepared with other options (--smoothing)" in capsys.readouterr().err
    # Another speaker scheme would mix the split by speaker.
    assert prepare(source, output, "--speaker-from", "prefix") == 1
    assert "prepared with other options (--speaker-from)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_make_what_one_makes(raw, prepared, tmp_path):
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    command += ["-m", "diffused_heads", "prepare-dataset", str(raw), str(tmp_path / "two"), "--size", str(SIZE)]
    result = subprocess.run(command + ["--test-fraction", "0.5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = manifest(prepared), manifest(tmp_path / "two")
    assert two["clips"] == one["clips"] and two["dropped"] == one["dropped"]
    for clip in one["clips"]:
        for name in ("frames.npy", "audio.npy", "mouth_boxes.npy"):
            a = np.load(prepared / "clips" / clip["id"] / name)
            b = np.load(tmp_path / "two" / "clips" / clip["id"] / name)
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_fine_tuning_runs_over_two_processes(prepared, tmp_path):
    start = tmp_path / "start"
    tiny_pipeline().save_pretrained(start)
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    command += ["-m", "diffused_heads", "train", "--data", str(prepared), "--init-from", str(start), "--output-dir"]
    command += [
        str(tmp_path / "tuned"),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        "--threads",
        "1",
        "--lr-warmup-steps",
        "3",
        "--log-every",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("saved the pipeline") == 1  # one training run over two processes, not two runs
    before = DiffusedHeadsPipeline.from_pretrained(start).unet.state_dict()
    after = DiffusedHeadsPipeline.from_pretrained(tmp_path / "tuned").unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The warm-up counts optimisation steps, not the scheduler's steps (one per process): the learning rate at
    # every step is a one-process run's.
    one = ["--data", str(prepared), "--init-from", str(start), "--output-dir", str(tmp_path / "one")]
    one += ["--max-steps", "3", "--batch-size", "2", "--num-workers", "0"]
    one += ["--lr-warmup-steps", "3", "--log-every", "1"]
    assert train.main(one) == 0

    def rates(name):
        return [json.loads(line)["lr"] for line in open(tmp_path / f"{name}-checkpoints" / "train_log.jsonl")]

    assert rates("tuned") == rates("one")
    assert len(set(rates("one"))) == 3  # still warming up: each step's rate is its own


def test_bad_input_is_one_line(tmp_path, capsys):
    assert prepare(tmp_path / "missing", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: RAW {tmp_path / 'missing'}: no such folder"]
    (tmp_path / "empty").mkdir()
    assert prepare(tmp_path / "empty", tmp_path / "out") == 1
    assert "no videos" in capsys.readouterr().err
    nobody = tmp_path / "nobody"
    nobody.mkdir()
    empty = [np.asarray(busy_background(160, 120, seed=k)) for k in range(30)]
    audio = np.asarray(np.random.default_rng(0).normal(0, 0.1, 19200), np.float32)
    write_video(str(nobody / "a.mp4"), empty, fps=25, audio=audio)
    (nobody / "b.mp4").write_bytes(b"garbage")
    assert prepare(nobody, tmp_path / "out2") == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert lines == ["error: no usable clips in " + str(nobody) + ": 2 part(s) left out (no face: 1, unreadable: 1)"]


def test_fine_tuning_a_tiny_model_on_the_prepared_set_lowers_its_loss(prepared, tmp_path):
    start = tmp_path / "start"
    tiny_pipeline().save_pretrained(start)  # a tiny "converted" model (16 px): frames are resized to it
    arguments = ["--data", str(prepared), "--split", "all", "--init-from", str(start), "--output-dir"]
    arguments += [str(tmp_path / "tuned"), "--max-steps", "60", "--batch-size", "4", "--learning-rate", "3e-3"]
    arguments += ["--ema-decay", "0", "--num-workers", "1", "--log-every", "60", "--threads", "2"]
    assert train.main(arguments) == 0

    def loss_of(folder):
        """The objective on fixed batches of the prepared clips (the same noise and steps for both models)."""
        from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline, to_motion_frame

        pipe = DiffusedHeadsPipeline.from_pretrained(folder)
        data = dataset.PreparedDataset(str(prepared))
        embeddings = str(tmp_path / "embeddings")
        folder_of = training.embeddings_folder(pipe.audio_encoder, embeddings)
        training.precompute_embeddings(pipe.audio_encoder, data, folder_of, "cpu", show=False)
        config = pipe.unet.config
        samples = training.TrainingFrames(data, config.sample_size, config.audio_context, folder_of)
        objective = training.DiffusionObjective(pipe.scheduler, lip_weight=0.0)
        total = []
        for step in range(8):
            generator = torch.Generator().manual_seed(step)
            plans = training.plan_batch([c.frames for c in data.clips], 8, generator)
            batch = training.collate_samples([samples[p] for p in plans])
            noise = torch.randn(batch["x_start"].shape, generator=generator)
            timesteps = torch.randint(1000, (8,), generator=generator)
            x_t = objective.add_noise(batch["x_start"], noise, timesteps)
            channels = pipe.unet.config.motion_frame_channels
            motion = torch.cat([to_motion_frame(batch["motion"][:, k], channels) for k in range(2)], 1)
            with torch.no_grad():
                output = pipe.unet(x_t, timesteps, batch["identity"], motion, batch["audio"][:, -1]).sample
            total.append(objective(output, noise, batch["x_start"], x_t, timesteps)["simple"].item())
        return float(np.mean(total))

    before, after = loss_of(start), loss_of(tmp_path / "tuned")
    assert after < 0.7 * before, (before, after)


def test_a_folder_of_ready_clips_converts_with_one_command(tmp_path):
    from diffused_heads import make_dataset

    clips = tmp_path / "clips"
    assert make_dataset.main(["--output", str(clips), "--num-clips", "2", "--size", "32", "--max-seconds", "1"]) == 0
    assert prepare_dataset.main([str(clips), str(tmp_path / "data"), "--aligned", "--size", "16"]) == 0
    data = dataset.PreparedDataset(str(tmp_path / "data"))
    assert len(data.clips) == 2 and data.size == 16
    assert all(data.mouth_boxes(c) is not None for c in data.clips)
    assert os.path.isfile(tmp_path / "data" / "clips" / data.clips[0].id / "frames.npy")


def test_a_clips_audio_is_the_sources_own_at_the_clips_frames(raw, prepared):
    """Clips that start after a video's first frame (a scene cut, a face that comes back) carry the speech of
    their own frames: the source's 16 kHz audio from the clip's first frame on, not from the video's start."""
    from diffused_heads.media import SAMPLES_PER_FRAME, load_audio

    data = dataset.PreparedDataset(str(prepared))
    later = [clip for clip in data.clips if manifest_entry(prepared, clip.id)["start_frame"] > 0]
    assert len(later) >= 2
    for clip in later:
        start = manifest_entry(prepared, clip.id)["start_frame"] * SAMPLES_PER_FRAME
        source = load_audio(str(raw / clip.source))
        own = source[start : start + clip.frames * SAMPLES_PER_FRAME]
        written = data.audio(clip)
        assert written.shape == own.shape
        np.testing.assert_allclose(written, own, atol=2e-3)
        # and so far from the video's first frames that the check above tells them apart
        assert np.abs(written - source[: len(written)]).max() > 0.05


def manifest_entry(folder, clip_id):
    return next(c for c in manifest(folder)["clips"] if c["id"] == clip_id)


def test_the_alignment_is_the_smoothed_transforms(raw, tmp_path, monkeypatch):
    """Every frame is aligned with its transform smoothed over `--smoothing` frames: the matrices that reach
    `align_frame` are `smooth_transforms`' output, which is steadier than the per-frame fits it was given."""
    from diffused_heads import faces

    smoothed, used = [], []
    smooth, align = faces.smooth_transforms, faces.align_frame

    def record_smoothing(matrices, radius, times=None):
        result = smooth(matrices, radius, times)
        smoothed.append((np.array(matrices), radius, result))
        return result

    def record_alignment(frame, matrix, *args, **kwargs):
        used.append(np.array(matrix))
        return align(frame, matrix, *args, **kwargs)

    monkeypatch.setattr(faces, "smooth_transforms", record_smoothing)
    monkeypatch.setattr(faces, "align_frame", record_alignment)
    source = tmp_path / "raw"
    source.mkdir()
    shutil.copy(raw / "anna" / "moving.mp4", source / "moving.mp4")
    assert prepare(source, tmp_path / "data", "--smoothing", "5") == 0
    assert len(smoothed) == 1
    given, radius, result = smoothed[0]
    assert radius == 5
    np.testing.assert_allclose(np.stack(used), result)

    def roughness(matrices):  # the shift's second differences: frame-to-frame wobble
        return float(np.abs(np.diff(matrices[:, :, 2], n=2, axis=0)).mean())

    assert roughness(result) < 0.7 * roughness(given)


def test_the_first_pass_follows_one_face_splits_at_a_cut_and_says_what_it_leaves_out():
    """Pass 1 on frames made in memory: a face for 20 frames, a cut to another face for 20, then 2 empty frames:
    two parts, split at the cut; a minimum of 21 frames leaves both out as too short; no frames, or frames without
    a face, give no parts and one reason."""
    from diffused_heads.video_preparation import detect_and_follow

    frames = [np.asarray(frame_at(k / 25, "astronaut")) for k in range(20)]
    frames += [np.asarray(frame_at(k / 25, "hopper", background=busy_background(320, 240))) for k in range(20)]
    frames += [np.zeros((240, 320, 3), np.uint8)] * 2

    def reader(video):
        return lambda limit: ((k, k / 25, frame) for k, frame in enumerate(video[:limit]))

    detection, dropped = detect_and_follow(reader(frames), 100, "a.mp4", max_gap=2, min_frames=5)
    assert [(s.start, s.end) for s in detection.segments] == [(0, 20), (20, 40)] and dropped == []
    assert len(detection.boxes) == len(detection.times) == 42 and detection.boxes[-1] == []
    detection, dropped = detect_and_follow(reader(frames), 100, "a.mp4", max_gap=2, min_frames=21)
    assert detection is None and [d["reason"].split(":")[0] for d in dropped] == ["too short", "too short"]
    assert detect_and_follow(reader([]), 100, "a.mp4", 2, 5) == (
        None,
        [{"source": "a.mp4", "reason": "unreadable: no video frames"}],
    )
    detection, dropped = detect_and_follow(reader(frames[-2:] * 5), 100, "a.mp4", 2, 5)
    assert detection is None and dropped == [{"source": "a.mp4", "reason": "no face: none found"}]


def test_holding_back_a_loggers_warnings_leaves_other_threads_and_the_level_alone():
    """While one video's silence is said as a reason (video_preparation holds back `media`'s own warning about
    it), another thread's warnings from the same logger still pass, and the logger's level is not touched."""
    import logging
    import threading

    from diffused_heads.video_preparation import _quiet

    from helpers import logged

    media_logger = logging.getLogger("diffused_heads.media")
    level = media_logger.level
    with logged() as messages:
        with _quiet("diffused_heads.media"):
            media_logger.warning("this thread's, held back")
            other = threading.Thread(target=media_logger.warning, args=("another thread's",))
            other.start()
            other.join()
            assert media_logger.level == level
        media_logger.warning("after")
    assert messages == ["warning: another thread's", "warning: after"]


def test_a_video_that_ends_early_in_the_last_pass_leaves_no_partial_clip_and_says_so(
    raw, tmp_path, monkeypatch, capsys
):
    """A stream that decodes fewer frames in the writing pass than in the passes before: the clip it cuts short is
    not kept (no `.partial` folder stays behind) and is left out with its reason in the manifest."""
    from diffused_heads import video_preparation

    real = video_preparation.read_frames

    def shorter_in_the_last_pass(path):
        read, passes = real(path), []

        def reader(limit):
            passes.append(limit)
            for index, shown, frame in read(limit):
                if len(passes) == 3 and index == 20:  # the third pass (writing) ends at frame 20
                    return
                yield index, shown, frame

        return reader

    monkeypatch.setattr(video_preparation, "read_frames", shorter_in_the_last_pass)
    source = tmp_path / "raw"
    source.mkdir()
    shutil.copy(raw / "anna" / "moving.mp4", source / "moving.mp4")
    assert prepare(source, tmp_path / "data") == 1  # its only clip is gone: no usable clips, said as an error
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "data" / "records").rglob("*.json")]
    assert record["clips"] == []
    [reason] = [d["reason"] for d in record["dropped"]]
    assert reason.startswith("ended early: frames 0-50 were not reached in the last pass")
    assert os.listdir(tmp_path / "data" / "clips") == []
    assert "1 part(s) left out (ended early: 1)" in capsys.readouterr().err
