"""Batch generation's jobs and their runs: jobs read from a CSV or JSON-lines file or made from a folder of clips,
planned into batches, and each batch generated with every clip's frames written as they are made (`BatchRunner`).
`diffused-heads generate-batch` shares the batches out over the processes of `accelerate launch`."""

import csv
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from .errors import ArgumentError

JOB_FIELDS = ("image", "audio", "output", "seed", "frame", "steps", "scheduler", "paste_back")
YES, NO = ("1", "true", "yes", "y"), ("0", "false", "no", "n")


@dataclass
class Job:
    index: int
    image: str
    audio: str
    output: str  # absolute path of the video to write
    seed: int
    frame: Optional[int] = None
    steps: Optional[int] = None
    scheduler: Optional[str] = None
    max_frames: Optional[int] = None  # a clip of a folder: as many frames as the clip has
    paste_back: Optional[bool] = None  # None: as --paste-back says
    seconds: Optional[float] = (
        None  # the audio's length from its header (None: unknown), read when batches are planned
    )


@dataclass
class Result:
    index: int
    output: str
    status: str  # "done", "skipped" or "failed"
    frames: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


# --------------------------------------------------------------------------------------------------
# Jobs


def _resolve(path: str, folder: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(folder, path)


def read_jobs(path: str, output_dir: str, default_seed: int) -> List[Job]:
    """Jobs from a CSV (header row) or JSON-lines file; relative paths are taken from the file's folder."""
    if not os.path.isfile(path):
        raise ArgumentError("jobs", f"{path}: no such file")

    def bad(number, message):
        return ArgumentError("jobs", f"{path}, line {number}: {message}")

    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith((".jsonl", ".json")):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as error:
                        raise bad(number, f"not JSON ({error})") from None
                    if not isinstance(row, dict):
                        raise bad(number, "expected an object with image and audio")
                    rows.append((number, row))
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "audio"} <= set(reader.fieldnames):
                raise ArgumentError("jobs", f"{path}: a CSV file needs a header row with at least image,audio")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
    jobs = []
    for number, row in rows:
        unknown = set(row) - set(JOB_FIELDS)
        if unknown:
            raise bad(number, f"unknown fields {sorted(unknown)}; known: {JOB_FIELDS}")
        if not row.get("image") or not row.get("audio"):
            raise bad(number, "image and audio are required")
        try:
            seed = int(row["seed"]) if row.get("seed") not in (None, "") else default_seed
            frame = int(row["frame"]) if row.get("frame") not in (None, "") else None
            steps = int(row["steps"]) if row.get("steps") not in (None, "") else None
        except (TypeError, ValueError):
            raise bad(number, "seed, frame and steps must be whole numbers") from None
        scheduler = row.get("scheduler") or None
        from .runtime import SCHEDULERS

        if scheduler is not None and scheduler not in SCHEDULERS:
            raise bad(number, f"scheduler {scheduler!r} is not one of {SCHEDULERS}")
        if steps is not None and steps < 1:
            raise bad(number, "steps must be at least 1")
        paste_back = row.get("paste_back")
        if isinstance(paste_back, str):
            if paste_back.strip().lower() not in YES + NO + ("",):
                raise bad(number, f"paste_back must be true or false, got {paste_back!r}")
            paste_back = None if not paste_back.strip() else paste_back.strip().lower() in YES
        elif paste_back is not None and not isinstance(paste_back, bool):
            raise bad(number, f"paste_back must be true or false, got {paste_back!r}")
        audio = _resolve(str(row["audio"]), folder)
        output = row.get("output") or os.path.splitext(os.path.basename(audio))[0] + ".mp4"
        image = _resolve(str(row["image"]), folder)
        jobs.append(Job(len(jobs), image, audio, output, seed, frame, steps, scheduler, paste_back=paste_back))
    return _place_outputs(jobs, output_dir, f"{path}", lines=[number for number, _ in rows])


def clip_jobs(folder: str, output_dir: str, default_seed: int) -> List[Job]:
    """One job per video of `folder`: its own frame and its own audio track."""
    from .media import VIDEO_EXTENSIONS, video_frame_count

    if not os.path.isdir(folder):
        raise ArgumentError("clips", f"{folder}: no such folder")
    videos = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise ArgumentError("clips", f"{folder}: no videos ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    jobs = [
        Job(i, os.path.join(folder, n), os.path.join(folder, n), os.path.splitext(n)[0] + ".mp4", default_seed)
        for i, n in enumerate(videos)
    ]
    for job in jobs:
        try:
            job.max_frames = video_frame_count(job.image, decode=False)
        except ValueError:  # the job reports the reading error itself when it runs
            job.max_frames = None
    return _place_outputs(jobs, output_dir, folder)


def _place_outputs(jobs: List[Job], output_dir: str, source: str, lines: Optional[List[int]] = None) -> List[Job]:
    """Each job's output as an absolute path inside `output_dir` (an output that would land outside is refused),
    distinct for every job."""
    if not jobs:
        raise ArgumentError("jobs", f"{source} holds no jobs")
    root = os.path.realpath(output_dir)
    seen = {}
    for job in jobs:
        where = f"{source}, line {lines[job.index]}" if lines else source
        if os.path.splitext(job.output)[1].lower() != ".mp4":
            job.output += ".mp4"
        placed = os.path.realpath(os.path.join(root, job.output))
        if os.path.commonpath([root, placed]) != root or placed == root:
            raise ArgumentError("jobs", f"{where}: output {job.output!r} is not inside the output folder")
        job.output = placed
        if job.output in seen:
            raise ArgumentError(
                "jobs",
                f"{where}: jobs {seen[job.output]} and {job.index} would both write {job.output}; give them an "
                "output name",
            )
        seen[job.output] = job.index
    return jobs


def plan_batches(jobs: List[Job], batch_size: int) -> List[List[Job]]:
    """The jobs in batches of up to `batch_size`, each of one steps-and-sampler setting, neighbours in length
    (so little is computed for padding), in a fixed order: the same batches for any number of processes."""
    from .media import audio_duration

    groups = {}
    for job in jobs:
        if job.seconds is None:
            job.seconds = audio_duration(job.audio)
        groups.setdefault((job.steps, job.scheduler), []).append(job)
    batches = []
    for group in groups.values():
        group = sorted(group, key=lambda job: (job.seconds is None, job.seconds or 0.0, job.index))
        batches += [group[start : start + batch_size] for start in range(0, len(group), batch_size)]
    return batches


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class BatchSettings:
    """How every job of a run is made, where the job itself does not say (a job's own `steps`, `scheduler` and
    `paste_back` win)."""

    model: Optional[str] = None  # a folder, a Hub id or None for the built-in default model
    dtype: str = "auto"
    compile: bool = False
    scheduler: Optional[str] = None  # None: the model's own sampler
    steps: Optional[int] = None  # None: the model's own
    stabilize_every: Optional[int] = None
    prepare: bool = True  # find, align and crop the face (False: images are used as they are)
    random_frame: bool = False  # a seeded random frame of a video, not the first
    paste_back: bool = False
    max_size: int = 1920  # with paste-back: photos longer than this are scaled down to it
    size: Optional[int] = None  # the output's side without paste-back (None: the model's)


def prepare_job(job: Job, settings: BatchSettings):
    """The identity frame (prepared as `generate` prepares it), the 16 kHz speech of a job, and how its frames
    are written: `(paste, size)` (see `paste.paste_back_for`; no pasting and `settings.size` without
    paste-back); raises ValueError (MediaError, ArgumentError) or OSError for bad input."""
    from . import runtime
    from .media import SAMPLES_PER_FRAME, load_audio
    from .paste import paste_back_for

    paste_back = settings.paste_back if job.paste_back is None else job.paste_back
    if paste_back and not settings.prepare:
        raise ArgumentError("paste_back", "needs the face's alignment to invert; it cannot be used with --no-prepare")
    identity, aligned, photo = runtime.identity_frame(
        job.image,
        model=settings.model,
        prepare=settings.prepare,
        frame=job.frame,
        random_frame=settings.random_frame,
        seed=job.seed,
        with_alignment=True,
    )
    audio = load_audio(job.audio)
    if job.max_frames:  # compressed audio tracks run a little past the video (codec padding)
        audio = audio[: job.max_frames * SAMPLES_PER_FRAME]
    writing = paste_back_for(identity, aligned, photo, settings.max_size) if paste_back else (None, settings.size)
    return identity, audio, writing


class BatchRunner:
    """One process's part of a run: its batches, the model (loaded only if there is something to make) and the
    results. `on_result(result)` is called as each job ends and `on_frame()` as each frame is written."""

    def __init__(
        self,
        settings: BatchSettings,
        device,
        on_result: Optional[Callable[["Result"], None]] = None,
        on_frame: Optional[Callable[[], None]] = None,
    ):
        self.settings, self.device = settings, device
        self.on_result, self.on_frame = on_result, on_frame
        self.results: List[Result] = []
        self.pipe = None

    def record(self, result: Result) -> None:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)

    def frame_made(self) -> None:
        if self.on_frame is not None:
            self.on_frame()

    def run(self, batches: List[List[Job]]) -> None:
        for batch in batches:
            self.run_batch(batch)

    def run_batch(self, batch: List[Job]) -> None:
        """Prepare the batch's jobs (just before they run), generate them together and write each clip's frames as
        they are made."""
        import torch

        from . import runtime
        from .media import SAMPLING_RATE, VideoWriter

        ready = []
        for job in batch:
            try:
                ready.append((job, *prepare_job(job, self.settings)))
            except (ValueError, OSError) as error:
                self.record(Result(job.index, job.output, "failed", error=str(error)))
        if not ready:
            return
        if self.pipe is None:
            self.pipe = runtime.load_pipeline(
                self.settings.model, self.device, self.settings.dtype, compile=self.settings.compile
            )
        pipe = runtime.with_scheduler(self.pipe, batch[0].scheduler or self.settings.scheduler)
        steps = batch[0].steps or self.settings.steps or runtime.default_steps(pipe)
        writers = {}
        for job, _, audio, (_, size) in ready:
            os.makedirs(os.path.dirname(job.output), exist_ok=True)
            writers[job.index] = VideoWriter(job.output, audio, size=size)
        started, active = time.perf_counter(), {job.index: job for job, *_ in ready}
        try:
            for output in pipe.stream(
                [identity for _, identity, _, _ in ready],
                [audio for _, _, audio, _ in ready],
                sampling_rate=SAMPLING_RATE,
                num_inference_steps=steps,
                stabilize_every=self.settings.stabilize_every,
                generator=[torch.Generator(self.device).manual_seed(job.seed) for job, *_ in ready],
            ):
                for k, (job, _, _, (paste, _)) in enumerate(ready):
                    if job.index not in active or output.frame_index >= output.num_frames[k]:
                        continue
                    try:
                        frame = output.frames[k]
                        writers[job.index].write(frame if paste is None else paste(frame))
                        self.frame_made()
                        if output.frame_index + 1 == output.num_frames[k]:
                            writers[job.index].close()
                            del active[job.index]
                            seconds = time.perf_counter() - started
                            self.record(Result(job.index, job.output, "done", output.num_frames[k], seconds))
                    except (OSError, ValueError) as error:
                        writers[job.index].abort()
                        del active[job.index]
                        self.record(Result(job.index, job.output, "failed", error=f"writing failed: {error}"))
                if not active:
                    break
        except (ValueError, RuntimeError) as error:
            for index, job in list(active.items()):
                writers[index].abort()
                self.record(Result(index, job.output, "failed", error=f"generation failed: {error}"))
            active.clear()
        finally:  # an interruption: nothing half-written stays
            for index in active:
                writers[index].abort()


def estimated_frames(job: Job) -> int:
    """The frames a job will make, from its audio's length (0 when that is unknown): one per 640 samples."""
    from .media import SAMPLES_PER_FRAME, SAMPLING_RATE

    frames = round((job.seconds or 0.0) * SAMPLING_RATE) // SAMPLES_PER_FRAME
    return min(frames, job.max_frames) if job.max_frames else frames
