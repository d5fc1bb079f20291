"""generate-batch: jobs files, clip folders, several processes through accelerate, resuming and failures."""

import json
import os
import subprocess

import av
import numpy as np
import PIL.Image
import pytest
import soundfile

from diffused_heads.errors import ArgumentError
from diffused_heads.jobs import clip_jobs, plan_batches, read_jobs
from diffused_heads.media import export_to_video_with_audio

from helpers import free_port, pasted_and_beside, speech_like, tiny_pipeline

SECONDS = (0.3, 0.5, 0.2, 0.4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    tiny_pipeline().save_pretrained(folder / "model")
    rows = ["image,audio,output,seed"]
    for k, seconds in enumerate(SECONDS):
        image = np.random.RandomState(k).randint(0, 256, (20, 20, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(folder / f"face{k}.png")
        soundfile.write(folder / f"speech{k}.wav", speech_like(seconds, seed=k), 16000)
        rows.append(f"face{k}.png,speech{k}.wav,clip{k}.mp4,{k}")
    (folder / "broken.wav").write_bytes(b"RIFF but not a wave file")
    rows.insert(3, "face0.png,broken.wav,broken.mp4,7")
    (folder / "jobs.csv").write_text("\n".join(rows) + "\n")
    return folder


def generate_batch(workspace, output, *extra, processes=1):
    arguments = ["--jobs", "jobs.csv", "--output-dir", output, "--model", "model", "--steps", "2", "--size", "32"]
    if processes == 1:
        command = ["diffused-heads", "generate-batch"]
    else:  # accelerate starts the processes through torchrun; without a GPU they talk over gloo
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
        command += ["--main_process_port", str(free_port()), "-m", "diffused_heads", "generate-batch"]
    result = subprocess.run(command + arguments + list(extra), cwd=workspace, capture_output=True, text=True)
    summary = json.loads((workspace / output / "summary.json").read_text())
    return result, summary


def decoded(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.slow
def test_two_processes_give_the_videos_of_one_and_resume_without_regenerating(workspace):
    # The same arithmetic in both runs (one thread per process): a different thread count changes how the
    # convolutions add up, in the last float bits, which the frame loop of an untrained UNet can amplify.
    single, summary = generate_batch(workspace, "one", "--batch-size", "4", "--threads", "1")
    assert single.returncode == 1  # one job failed
    assert summary["summary"]["processes"] == 1
    assert (summary["summary"]["done"], summary["summary"]["failed"]) == (4, 1)
    assert "done 4, skipped 0, failed 1 of 5 jobs" in single.stdout

    double, summary = generate_batch(workspace, "two", "--batch-size", "4", "--threads", "1", processes=2)
    assert double.returncode != 0
    assert summary["summary"]["processes"] == 2
    [failed] = [job for job in summary["jobs"] if job["status"] == "failed"]
    assert failed["output"].endswith("broken.mp4") and "broken.wav" in failed["error"]
    assert sorted(os.listdir(workspace / "two")) == [
        "clip0.mp4",
        "clip1.mp4",
        "clip2.mp4",
        "clip3.mp4",
        "summary-001.json",
        "summary.json",
    ]
    for k, seconds in enumerate(SECONDS):
        one, two = decoded(workspace / "one" / f"clip{k}.mp4"), decoded(workspace / "two" / f"clip{k}.mp4")
        assert len(one) == (int(seconds * 16000) + 2560 - 3200) // 640 + 1
        assert np.array_equal(one, two), k

    stamps = {name: os.stat(workspace / "two" / name).st_mtime_ns for name in os.listdir(workspace / "two")}
    again, summary = generate_batch(workspace, "two", "--batch-size", "4", processes=2)
    counts = summary["summary"]
    assert (counts["done"], counts["skipped"], counts["failed"]) == (0, 4, 1)
    for name, stamp in stamps.items():
        if name != "summary.json":
            assert os.stat(workspace / "two" / name).st_mtime_ns == stamp, name
    assert not (workspace / "two" / ".diffused-heads-progress").exists()
    # Each run's summary is kept.
    first = json.loads((workspace / "two" / "summary-001.json").read_text())["summary"]
    assert (first["done"], first["skipped"]) == (4, 0)
    assert json.loads((workspace / "two" / "summary-002.json").read_text())["summary"] == counts


@pytest.mark.slow
def test_batch_size_and_thread_count_change_a_clip_only_in_the_last_bits(workspace):
    alone, summary = generate_batch(workspace, "alone", "--batch-size", "1", "--threads", "2")
    assert summary["summary"]["done"] == 4
    together, _ = generate_batch(workspace, "together", "--batch-size", "4", "--threads", "1")
    for k in range(4):
        one, four = decoded(workspace / "alone" / f"clip{k}.mp4"), decoded(workspace / "together" / f"clip{k}.mp4")
        assert one.shape == four.shape
        difference = np.abs(one.astype(int) - four.astype(int)).mean()
        print(f"clip {k}: mean difference {difference:.3f} / 255")
        assert difference < 1.0, k


@pytest.mark.slow
def test_a_clip_folder_animates_each_video_with_its_own_audio(workspace, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for k, seconds in enumerate((0.4, 0.24)):
        frames = np.random.RandomState(k).rand(round(seconds * 25), 32, 32, 3).astype(np.float32)
        t = np.arange(int(seconds * 16000)) / 16000
        voice = (0.3 * np.sin(2 * np.pi * (180 + 170 * k) * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        export_to_video_with_audio(frames, voice, str(clips / f"take{k}.mp4"), size=None)
    (clips / "notes.txt").write_text("not a video")
    jobs = clip_jobs(str(clips), str(tmp_path / "out"), default_seed=3)
    assert [os.path.basename(j.image) for j in jobs] == ["take0.mp4", "take1.mp4"]
    assert all(j.image == j.audio and j.seed == 3 for j in jobs)
    command = ["diffused-heads", "generate-batch", "--clips", str(clips), "--output-dir", str(tmp_path / "out")]
    command += ["--model", str(workspace / "model"), "--steps", "1", "--size", "32", "--random-frame"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for k, seconds in enumerate((0.4, 0.24)):  # as many frames as the source clip (10 and 6)
        assert len(decoded(tmp_path / "out" / f"take{k}.mp4")) == len(decoded(clips / f"take{k}.mp4"))
    # Each video speaks its own clip's audio: it matches that clip's track and not the other's.
    from diffused_heads.media import load_audio

    made = [load_audio(str(tmp_path / "out" / f"take{k}.mp4")) for k in range(2)]
    sources = [load_audio(str(clips / f"take{k}.mp4")) for k in range(2)]
    length = min(len(a) for a in made + sources)
    similarity = np.array([[np.corrcoef(m[:length], s[:length])[0, 1] for s in sources] for m in made])
    assert similarity[0, 0] > 0.9 and similarity[1, 1] > 0.9 and abs(similarity[0, 1]) < 0.5, similarity


@pytest.mark.parametrize(
    "content, message",
    [
        ("image\nface.png\n", "header row with at least image,audio"),
        ("image,audio,colour\nface.png,a.wav,red\n", "unknown fields ['colour']"),
        ("image,audio,scheduler\nface.png,a.wav,turbo\n", "scheduler 'turbo' is not one of"),
        ("image,audio,seed\nface.png,a.wav,one\n", "seed, frame and steps must be whole numbers"),
        ("image,audio\nface.png,a.wav\nface.png,a.wav\n", "would both write"),
        ("image,audio\n,a.wav\n", "image and audio are required"),
    ],
)
def test_bad_jobs_files_are_named(content, message, tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text(content)
    with pytest.raises(ArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_jobs(str(path), str(tmp_path / "out"), default_seed=0)


def test_json_lines_jobs_and_their_defaults(tmp_path):
    path = tmp_path / "jobs.jsonl"
    lines = [
        {"image": "a.png", "audio": "speech/one.wav", "seed": 5, "steps": 3, "scheduler": "ddim"},
        {"image": "/abs/b.png", "audio": "two.flac", "output": "named"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first, second = read_jobs(str(path), str(tmp_path / "out"), default_seed=11)
    assert first.image == str(tmp_path / "a.png") and first.audio == str(tmp_path / "speech" / "one.wav")
    assert (first.seed, first.steps, first.scheduler) == (5, 3, "ddim")
    assert first.output == str(tmp_path / "out" / "one.mp4")
    assert second.image == "/abs/b.png" and second.seed == 11 and second.output == str(tmp_path / "out" / "named.mp4")


def test_an_output_outside_the_output_folder_is_refused(tmp_path):
    for output in ("../escaped.mp4", "/tmp/elsewhere.mp4", "sub/../../up.mp4"):
        path = tmp_path / "jobs.jsonl"
        path.write_text(json.dumps({"image": "a.png", "audio": "a.wav", "output": output}) + "\n")
        with pytest.raises(ArgumentError, match="is not inside the output folder"):
            read_jobs(str(path), str(tmp_path / "out"), default_seed=0)
    path.write_text(json.dumps({"image": "a.png", "audio": "a.wav", "output": "sub/inside.mp4"}) + "\n")
    [job] = read_jobs(str(path), str(tmp_path / "out"), default_seed=0)
    assert job.output == str(tmp_path / "out" / "sub" / "inside.mp4")


def test_a_run_with_every_video_made_loads_no_model(workspace, tmp_path, monkeypatch, capsys):
    from diffused_heads import batch, runtime

    out = tmp_path / "out"
    out.mkdir()
    for k in range(4):
        (out / f"clip{k}.mp4").write_bytes(b"made earlier")
    (out / "broken.mp4").write_bytes(b"made earlier")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runtime, "load_pipeline", no_model)
    args = ["--jobs", str(workspace / "jobs.csv"), "--output-dir", str(out), "--model", str(workspace / "model")]
    assert batch.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 5, 0)


def test_batches_are_planned_before_the_jobs_are_shared_out(workspace, tmp_path):
    """The same batches whatever the number of processes: each process then takes whole batches."""
    from accelerate import PartialState

    jobs = read_jobs(str(workspace / "jobs.csv"), str(tmp_path), default_seed=0)
    batches = plan_batches(jobs, batch_size=2)
    assert [[job.index for job in batch] for batch in batches] == [[3, 0], [4, 1], [2]]  # by length, unreadable last
    assert all(len({(job.steps, job.scheduler) for job in batch}) == 1 for batch in batches)
    with PartialState(cpu=True).split_between_processes(batches) as mine:
        assert mine == batches  # one process takes them all


def test_each_video_of_a_batch_is_its_own_jobs_when_a_job_beside_it_fails(workspace, tmp_path):
    """A job that fails while being prepared (an image that is no image, with speech of a readable length, so it
    is planned into the batch of the others) leaves the others' videos their own: each has its own speech's
    frame count and the frames its job makes alone."""
    from diffused_heads import batch

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
    rows = ["image,audio,output,seed"]
    rows.append(f"{workspace / 'face0.png'},{workspace / 'speech0.wav'},first.mp4,0")
    rows.append(f"broken.png,{workspace / 'speech2.wav'},broken.mp4,2")  # the shortest: planned first
    rows.append(f"{workspace / 'face3.png'},{workspace / 'speech3.wav'},last.mp4,3")
    (tmp_path / "jobs.csv").write_text("\n".join(rows) + "\n")
    common = ["--jobs", str(tmp_path / "jobs.csv"), "--model", str(workspace / "model"), "--steps", "1"]
    common += ["--size", "32", "--threads", "1"]
    assert batch.main(common + ["--output-dir", str(tmp_path / "together"), "--batch-size", "3"]) == 1
    planned = plan_batches(read_jobs(str(tmp_path / "jobs.csv"), str(tmp_path), 0), 3)
    assert [job.output.endswith("broken.mp4") for job in planned[0]] == [True, False, False]
    assert batch.main(common + ["--output-dir", str(tmp_path / "alone"), "--batch-size", "1"]) == 1
    for name, seconds in (("first", SECONDS[0]), ("last", SECONDS[3])):
        together, alone = decoded(tmp_path / "together" / f"{name}.mp4"), decoded(tmp_path / "alone" / f"{name}.mp4")
        assert len(together) == (round(seconds * 16000) + 2560 - 3200) // 640 + 1
        assert together.shape == alone.shape
        assert np.abs(together.astype(int) - alone.astype(int)).mean() < 1.0, name
    assert not (tmp_path / "together" / "broken.mp4").exists()


def test_paste_back_by_flag_and_by_job(workspace, tmp_path):
    """A job's paste_back column overrides --paste-back: a pasted job's video has its photo's size and is the
    photo away from the head; the others have --size."""
    pytest.importorskip("mediapipe", reason="the faces extra is not installed")
    from diffused_heads import batch

    from talking_videos import hopper

    hopper().save(tmp_path / "photo.jpg")
    rows = ["image,audio,output,seed,paste_back"]
    rows.append(f"photo.jpg,{workspace / 'speech2.wav'},pasted.mp4,0,")
    rows.append(f"photo.jpg,{workspace / 'speech2.wav'},crop.mp4,0,false")
    (tmp_path / "jobs.csv").write_text("\n".join(rows) + "\n")
    args = ["--jobs", str(tmp_path / "jobs.csv"), "--model", str(workspace / "model"), "--steps", "1"]
    args += ["--size", "32", "--threads", "1", "--output-dir", str(tmp_path / "out"), "--paste-back"]
    assert batch.main(args + ["--max-size", "300"]) == 0
    pasted, crop = decoded(tmp_path / "out" / "pasted.mp4"), decoded(tmp_path / "out" / "crop.mp4")
    assert pasted.shape[1:] == (300, 256, 3) and crop.shape[1:] == (32, 32, 3)
    inside, beside = pasted_and_beside(pasted[0], tmp_path / "photo.jpg", str(workspace / "model"), max_size=300)
    assert inside > 15 and beside < 6  # the head in its box of the scaled photo, the photo right beside it

    with pytest.raises(SystemExit):
        batch.parse_args(args + ["--no-prepare"])
    (tmp_path / "jobs.csv").write_text(f"image,audio,paste_back\nphoto.jpg,{workspace / 'speech2.wav'},maybe\n")
    with pytest.raises(ArgumentError, match="paste_back must be true or false"):
        read_jobs(str(tmp_path / "jobs.csv"), str(tmp_path), 0)
