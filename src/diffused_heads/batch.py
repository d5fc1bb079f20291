"""Generate many talking-head videos, spread over every process that `accelerate launch` starts.

    diffused-heads generate-batch --jobs jobs.csv --output-dir videos/
    diffused-heads generate-batch --clips test-set/ --output-dir regenerated/ --model crema
    accelerate launch --num_processes 4 -m diffused_heads generate-batch --jobs jobs.jsonl --output-dir videos/

Jobs come from a CSV file (with a header) or a JSON-lines file with the fields `image` (an image or a video),
`audio`, and optionally `output` (a name inside `--output-dir`; default: the audio file's name), `seed`,
`frame`, `steps` and `scheduler`; relative paths are read from the jobs file's folder. `--clips FOLDER` makes
one job per video of the folder instead: its first frame (or, with `--random-frame`, a frame drawn with the job's
seed) animated with its own audio track, as the authors' sampling script does for a test set.

Every process takes its share of the jobs (`PartialState.split_between_processes`) and generates up to
`--batch-size` clips at a time; clips of different lengths share a batch (each keeps its own length). Each job
draws its noise from its own generator seeded with its seed, so a job gives the same video whatever the number
of processes and whatever else is in its batch (up to the last float bits of batched arithmetic). A job whose
output exists is skipped; a job that fails is recorded with its error and the others go on. At the end the main
process writes `summary.json` in the output folder and prints a table; the exit code is 1 if a job failed.
"""

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from .cli import HelpFormatter
from .generate import (
    DTYPES,
    SCHEDULERS,
    UsageError,
    configure_threads,
    identity_frame,
    load_pipeline,
    make_scheduler,
)
from .media import (
    SAMPLES_PER_FRAME,
    SAMPLING_RATE,
    VIDEO_EXTENSIONS,
    MediaError,
    export_to_video_with_audio,
    load_audio,
)

JOB_FIELDS = ("image", "audio", "output", "seed", "frame", "steps", "scheduler")
PROGRESS_FOLDER = ".diffused-heads-progress"


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
        raise UsageError(f"--jobs {path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith((".jsonl", ".json")):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as error:
                        raise UsageError(f"--jobs {path}, line {number}: not JSON ({error})") from None
                    if not isinstance(row, dict):
                        raise UsageError(f"--jobs {path}, line {number}: expected an object with image and audio")
                    rows.append((number, row))
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "audio"} <= set(reader.fieldnames):
                raise UsageError(f"--jobs {path}: a CSV file needs a header row with at least image,audio")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
    jobs = []
    for number, row in rows:
        unknown = set(row) - set(JOB_FIELDS)
        if unknown:
            raise UsageError(f"--jobs {path}, line {number}: unknown fields {sorted(unknown)}; known: {JOB_FIELDS}")
        if not row.get("image") or not row.get("audio"):
            raise UsageError(f"--jobs {path}, line {number}: image and audio are required")
        try:
            seed = int(row["seed"]) if row.get("seed") not in (None, "") else default_seed
            frame = int(row["frame"]) if row.get("frame") not in (None, "") else None
            steps = int(row["steps"]) if row.get("steps") not in (None, "") else None
        except (TypeError, ValueError):
            raise UsageError(f"--jobs {path}, line {number}: seed, frame and steps must be whole numbers") from None
        scheduler = row.get("scheduler") or None
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise UsageError(f"--jobs {path}, line {number}: scheduler {scheduler!r} is not one of {SCHEDULERS}")
        if steps is not None and steps < 1:
            raise UsageError(f"--jobs {path}, line {number}: steps must be at least 1")
        audio = _resolve(str(row["audio"]), folder)
        output = row.get("output") or os.path.splitext(os.path.basename(audio))[0] + ".mp4"
        jobs.append(Job(len(jobs), _resolve(str(row["image"]), folder), audio, output, seed, frame, steps, scheduler))
    return _place_outputs(jobs, output_dir, path)


def clip_jobs(folder: str, output_dir: str, default_seed: int) -> List[Job]:
    """One job per video of `folder`: its own frame and its own audio track."""
    if not os.path.isdir(folder):
        raise UsageError(f"--clips {folder}: no such folder")
    videos = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise UsageError(f"--clips {folder}: no videos ({', '.join(sorted(VIDEO_EXTENSIONS))})")
    jobs = [
        Job(i, os.path.join(folder, n), os.path.join(folder, n), os.path.splitext(n)[0] + ".mp4", default_seed)
        for i, n in enumerate(videos)
    ]
    for job in jobs:
        job.max_frames = _frame_count(job.image)
    return _place_outputs(jobs, output_dir, folder)


def _frame_count(path: str) -> Optional[int]:
    """Frames of a video (None when it cannot be told: the job then reports the reading error itself)."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return stream.frames
            if stream.duration and stream.average_rate:
                return round(float(stream.duration * stream.time_base * stream.average_rate))
    except (av.FFmpegError, IndexError, OSError):
        pass
    return None


def _place_outputs(jobs: List[Job], output_dir: str, source: str) -> List[Job]:
    if not jobs:
        raise UsageError(f"{source} holds no jobs")
    seen = {}
    for job in jobs:
        if os.path.splitext(job.output)[1].lower() != ".mp4":
            job.output += ".mp4"
        job.output = os.path.abspath(os.path.join(output_dir, job.output))
        if job.output in seen:
            raise UsageError(
                f"jobs {seen[job.output]} and {job.index} would both write {job.output}; give them an output name"
            )
        seen[job.output] = job.index
    return jobs


# --------------------------------------------------------------------------------------------------
# Generation


class ProgressBoard:
    """Jobs finished per process, shared through small files in the output folder (which every process of a
    run, on any node, writes to), so that the main process can show the whole run's progress."""

    def __init__(self, output_dir: str, process_index: int, num_processes: int):
        self.folder = os.path.join(output_dir, PROGRESS_FOLDER)
        self.process_index, self.num_processes = process_index, num_processes
        os.makedirs(self.folder, exist_ok=True)

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"{index}.json")

    def post(self, jobs: int, frames: int, finished: bool = False) -> None:
        temporary = self._path(self.process_index) + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"jobs": jobs, "frames": frames, "finished": finished}, f)
        os.replace(temporary, self._path(self.process_index))

    def read(self) -> dict:
        total = {"jobs": 0, "frames": 0, "finished": 0}
        for index in range(self.num_processes):
            try:
                with open(self._path(index), encoding="utf-8") as f:
                    posted = json.load(f)
            except (OSError, ValueError):
                continue
            total["jobs"] += posted["jobs"]
            total["frames"] += posted["frames"]
            total["finished"] += bool(posted["finished"])
        return total

    def remove(self) -> None:
        for index in range(self.num_processes):
            for path in (self._path(index), self._path(index) + ".tmp"):
                if os.path.exists(path):
                    os.remove(path)
        if os.path.isdir(self.folder) and not os.listdir(self.folder):
            os.rmdir(self.folder)


def prepare_job(job: Job, args):
    """The identity frame (prepared as `generate` prepares it) and the 16 kHz speech of a job; raises
    MediaError/ValueError/UsageError for bad input."""
    quiet = lambda message: None  # noqa: E731  (per-job notes would drown the progress display)
    identity = identity_frame(
        job.image,
        quiet,
        model=args.model,
        prepare=not args.no_prepare,
        frame=job.frame,
        random_frame=args.random_frame,
        seed=job.seed,
    )
    audio = load_audio(job.audio, log=quiet)
    if job.max_frames:  # compressed audio tracks run a little past the video (codec padding)
        audio = audio[: job.max_frames * SAMPLES_PER_FRAME]
    return identity, audio


def run_batch(pipe, jobs: List[Job], inputs: list, steps: int, args, device):
    """Generate a batch of clips (any lengths). Every clip draws its noise from its own seeded generator, which the
    pipeline uses exactly as in a run of that clip alone."""
    output = pipe(
        [identity for identity, _ in inputs],
        [audio for _, audio in inputs],
        sampling_rate=SAMPLING_RATE,
        num_inference_steps=steps,
        stabilize_every=args.stabilize_every,
        generator=[torch.Generator(device).manual_seed(job.seed) for job in jobs],
        output_type="np",
    )
    return list(output.frames), list(output.audio)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads generate-batch",
        description="Generate many videos; spreads over the processes of `accelerate launch` (see the module docs).",
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jobs", help="CSV (with a header) or JSON-lines file: image, audio[, output, seed, ...]")
    source.add_argument("--clips", help="a folder of videos: each is animated from its own frame with its own audio")
    parser.add_argument("--output-dir", required=True, help="where the videos and summary.json go (created)")
    parser.add_argument("--model", help="model folder or Hub id; default: the built-in demo model")
    parser.add_argument(
        "--steps", type=int, help="denoising steps per frame (default: 100; 10 for the built-in model)"
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: the model's own")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jobs that name none")
    parser.add_argument("--random-frame", action="store_true", help="a seeded random frame of a video, not the first")
    parser.add_argument(
        "--no-prepare", action="store_true", help="use the images as they are (see generate --no-prepare)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="clips generated at once in a process")
    parser.add_argument("--stabilize-every", type=int, metavar="N", help="as for generate")
    parser.add_argument("--size", type=int, default=256, help="output frame size in pixels")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="UNet precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on long runs)")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def generate_share(pipe, jobs: List[Job], args, device, board: ProgressBoard, bar) -> List[Result]:
    """Generate this process's jobs, `--batch-size` at a time, grouped by steps and scheduler."""
    results, done_jobs, done_frames = [], 0, 0
    pending = []
    for job in jobs:
        if os.path.exists(job.output):
            results.append(Result(job.index, job.output, "skipped"))
            done_jobs += 1
            continue
        pending.append(job)
    board.post(done_jobs, done_frames)
    default_scheduler = pipe.scheduler
    groups = {}
    for job in pending:
        groups.setdefault((job.steps or args.steps, job.scheduler or args.scheduler), []).append(job)
    for (steps, scheduler), group in groups.items():
        pipe.scheduler = make_scheduler(scheduler, default_scheduler.config) if scheduler else default_scheduler
        loaded = []
        for job in group:
            try:
                loaded.append((job, prepare_job(job, args)))
            except (MediaError, UsageError, ValueError, OSError) as error:
                results.append(Result(job.index, job.output, "failed", error=str(error)))
                done_jobs += 1
        # Neighbours in length share a batch, so little is computed for padding.
        loaded.sort(key=lambda item: len(item[1][1]))
        for start in range(0, len(loaded), args.batch_size):
            chunk = loaded[start : start + args.batch_size]
            batch_jobs = [job for job, _ in chunk]
            started = time.perf_counter()
            try:
                frames, audio = run_batch(pipe, batch_jobs, [inputs for _, inputs in chunk], steps, args, device)
            except (ValueError, RuntimeError) as error:
                for job in batch_jobs:
                    results.append(Result(job.index, job.output, "failed", error=f"generation failed: {error}"))
                done_jobs += len(batch_jobs)
                continue
            seconds = (time.perf_counter() - started) / len(batch_jobs)
            for job, video, waveform in zip(batch_jobs, frames, audio):
                try:
                    os.makedirs(os.path.dirname(job.output), exist_ok=True)
                    export_to_video_with_audio(video, waveform, job.output, size=args.size, overwrite=False)
                    results.append(Result(job.index, job.output, "done", frames=len(video), seconds=seconds))
                    done_frames += len(video)
                except (OSError, ValueError) as error:
                    results.append(Result(job.index, job.output, "failed", error=f"writing failed: {error}"))
                done_jobs += 1
            board.post(done_jobs, done_frames)
            if bar is not None:
                progress = board.read()
                bar.n = progress["jobs"]
                bar.set_postfix(frames=progress["frames"], refresh=False)
                bar.refresh()
    pipe.scheduler = default_scheduler
    return results


def print_summary(summary: dict, results: List[dict]) -> None:
    width = max([len(os.path.basename(r["output"])) for r in results] + [6])
    print(f"\n{'output':<{width}}  {'status':<7}  {'frames':>6}  {'s/clip':>7}  error")
    for r in sorted(results, key=lambda r: r["index"]):
        seconds = f"{r['seconds']:.1f}" if r["status"] == "done" else "-"
        print(
            f"{os.path.basename(r['output']):<{width}}  {r['status']:<7}  {r['frames']:>6}  {seconds:>7}  "
            f"{r['error'] or ''}"
        )
    print(
        f"\ndone {summary['done']}, skipped {summary['skipped']}, failed {summary['failed']} of {summary['jobs']} "
        f"jobs; {summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames_per_second']:.2f} "
        f"frames/s) on {summary['processes']} process(es)"
    )


def run(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    # On a machine without a GPU the processes talk over gloo (accelerate's multi-CPU mode).
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    # torchrun (under accelerate launch) says how many processes share this machine.
    configure_threads(args.threads, processes_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    started = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.jobs:
        jobs = read_jobs(args.jobs, args.output_dir, args.seed)
    else:
        jobs = clip_jobs(args.clips, args.output_dir, args.seed)

    device = state.device if args.device != "cpu" else torch.device("cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    if device.type == "cpu" and args.dtype == "float16":
        raise UsageError("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    pipe = load_pipeline(args, device, DTYPES[args.dtype], announce=state.is_main_process)
    if args.steps is None:
        args.steps = 10 if args.model is None else 100
    pipe.set_progress_bar_config(disable=True)

    board = ProgressBoard(args.output_dir, state.process_index, state.num_processes)
    bar = None
    if state.is_main_process:
        bar = tqdm(total=len(jobs), unit="job", desc="generate-batch", dynamic_ncols=True)
    with state.split_between_processes(jobs) as share:
        results = generate_share(pipe, share, args, device, board, bar)
    board.post(len(results), sum(r.frames for r in results), finished=True)
    if bar is not None:  # follow the other processes until all are finished
        while (progress := board.read())["finished"] < state.num_processes:
            bar.n = progress["jobs"]
            bar.refresh()
            time.sleep(0.5)
        bar.n = len(jobs)
        bar.close()
    everything = gather_object([asdict(r) for r in results])
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    board.remove()
    seconds = time.perf_counter() - started
    counts = {status: sum(r["status"] == status for r in everything) for status in ("done", "skipped", "failed")}
    frames = sum(r["frames"] for r in everything)
    summary = {
        "jobs": len(jobs),
        **counts,
        "frames": frames,
        "seconds": round(seconds, 2),
        "frames_per_second": frames / seconds if seconds else 0.0,
        "processes": state.num_processes,
        "batch_size": args.batch_size,
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "jobs": sorted(everything, key=lambda r: r["index"])}, f, indent=1)
    print_summary(summary, everything)
    return 1 if counts["failed"] else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, MediaError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished videos are kept, none is half-written", file=sys.stderr)
        return 130
