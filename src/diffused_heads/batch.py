"""Generate many talking-head videos, spread over every process that `accelerate launch` starts.

    diffused-heads generate-batch --jobs jobs.csv --output-dir videos/
    diffused-heads generate-batch --clips test-set/ --output-dir regenerated/ --model crema
    accelerate launch --num_processes 4 -m diffused_heads generate-batch --jobs jobs.jsonl --output-dir videos/

Jobs come from a CSV file (with a header) or a JSON-lines file with the fields `image` (an image or a video),
`audio`, and optionally `output` (a name inside `--output-dir`; default: the audio file's name), `seed`,
`frame`, `steps` and `scheduler`; relative paths are read from the jobs file's folder. `--clips FOLDER` makes
one job per video of the folder instead: its first frame (or, with `--random-frame`, a frame drawn with the job's
seed) animated with its own audio track, as the authors' sampling script does for a test set.

The jobs are put into batches of up to `--batch-size` clips (of the same steps and sampler, neighbours in length)
before they are shared out, and every process takes whole batches (`PartialState.split_between_processes`): a
job's video depends on its batch, never on the number of processes. Each job draws its noise from its own
generator seeded with its seed, exactly as a lone run of it does; batched arithmetic still differs from a lone
run's in the last float bits, which the frame loop amplifies (README: "Batches"), so `--batch-size 1` is the
setting that reproduces `generate`. Frames are written as they are made. A job whose output exists is skipped
(before any model is loaded); a job that fails is recorded with its error and the others go on. At the end the
main process writes the run's summary (`summary-NNN.json`, and `summary.json` for the latest run) in the output
folder and prints a table; the exit code is 1 if a job failed.
"""

import argparse
import csv
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

from .cli_utils import SCHEDULER_CHOICES, HelpFormatter, ProgressBoard, add_model_options, run_command
from .errors import ArgumentError

logger = logging.getLogger(__name__)

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
        if scheduler is not None and scheduler not in SCHEDULER_CHOICES:
            raise bad(number, f"scheduler {scheduler!r} is not one of {SCHEDULER_CHOICES}")
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


def prepare_job(job: Job, args):
    """The identity frame (prepared as `generate` prepares it), the 16 kHz speech of a job, and how its frames
    are written: `(paste, size)` (see `paste.paste_back_for`; no pasting and `--size` without paste-back); raises
    ValueError (MediaError, ArgumentError) or OSError for bad input."""
    from . import runtime
    from .media import SAMPLES_PER_FRAME, load_audio
    from .paste import paste_back_for

    paste_back = args.paste_back if job.paste_back is None else job.paste_back
    if paste_back and args.no_prepare:
        raise ArgumentError("paste_back", "needs the face's alignment to invert; it cannot be used with --no-prepare")
    identity, aligned, photo = runtime.identity_frame(
        job.image,
        model=args.model,
        prepare=not args.no_prepare,
        frame=job.frame,
        random_frame=args.random_frame,
        seed=job.seed,
        with_alignment=True,
    )
    audio = load_audio(job.audio)
    if job.max_frames:  # compressed audio tracks run a little past the video (codec padding)
        audio = audio[: job.max_frames * SAMPLES_PER_FRAME]
    writing = paste_back_for(identity, aligned, photo, args.max_size) if paste_back else (None, args.size)
    return identity, audio, writing


class Share:
    """This process's part of the run: its batches, the model (loaded only if there is something to make), the
    results and the counts posted to the board."""

    def __init__(self, args, device, board: ProgressBoard, bar):
        self.args, self.device, self.board, self.bar = args, device, board, bar
        self.results: List[Result] = []
        self.jobs_done = self.frames_done = 0
        self.pipe = None

    def record(self, result: Result) -> None:
        self.results.append(result)
        self.jobs_done += 1
        self.board.post(self.jobs_done, self.frames_done, every=0.5)

    def frame_made(self) -> None:
        self.frames_done += 1
        self.board.post(self.jobs_done, self.frames_done, every=0.5)
        if self.bar is not None:
            progress = self.board.read()
            self.bar.n = progress["frames"]
            self.bar.set_postfix(jobs=progress["jobs"], refresh=False)
            self.bar.refresh()

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
                ready.append((job, *prepare_job(job, self.args)))
            except (ValueError, OSError) as error:
                self.record(Result(job.index, job.output, "failed", error=str(error)))
        if not ready:
            return
        if self.pipe is None:
            self.pipe = runtime.load_pipeline(self.args.model, self.device, self.args.dtype, compile=self.args.compile)
        pipe = runtime.with_scheduler(self.pipe, batch[0].scheduler or self.args.scheduler)
        steps = batch[0].steps or self.args.steps or runtime.default_steps(pipe)
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
                stabilize_every=self.args.stabilize_every,
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads generate-batch",
        description="Generate many videos; spreads over the processes of `accelerate launch` (see the module docs).",
        formatter_class=HelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--jobs", help="CSV (with a header) or JSON-lines file: image, audio[, output, seed, ...]")
    source.add_argument("--clips", help="a folder of videos: each is animated from its own frame with its own audio")
    parser.add_argument("--output-dir", required=True, help="where the videos and the run's summary go (created)")
    add_model_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the jobs that name none")
    parser.add_argument("--random-frame", action="store_true", help="a seeded random frame of a video, not the first")
    parser.add_argument(
        "--no-prepare", action="store_true", help="use the images as they are (see generate --no-prepare)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="clips generated at once in a process (1 reproduces generate exactly: see the README's Batches)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    parser.add_argument(
        "--paste-back",
        action="store_true",
        help="every job's head back in its photo, at the photo's size (a job's paste_back column overrides it)",
    )
    parser.add_argument(
        "--max-size", type=int, default=1920, help="with paste-back: photos longer than this are scaled down to it"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.max_size < 16:
        parser.error("--max-size must be at least 16")
    if args.paste_back and args.no_prepare:
        parser.error("--paste-back needs the face's alignment to invert; it cannot be used with --no-prepare")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


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


def write_summary(output_dir: str, content: dict) -> str:
    """The run's summary as `summary-NNN.json` (the next free number: earlier runs' are kept) and as
    `summary.json`, the latest run's."""
    number = 1
    while os.path.exists(os.path.join(output_dir, f"summary-{number:03d}.json")):
        number += 1
    path = os.path.join(output_dir, f"summary-{number:03d}.json")
    for target in (path, os.path.join(output_dir, "summary.json")):
        temporary = target + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
        os.replace(temporary, target)
    return path


def estimated_frames(job: Job) -> int:
    """The frames a job will make, from its audio's length (0 when that is unknown): one per 640 samples."""
    from .media import SAMPLES_PER_FRAME, SAMPLING_RATE

    frames = round((job.seconds or 0.0) * SAMPLING_RATE) // SAMPLES_PER_FRAME
    return min(frames, job.max_frames) if job.max_frames else frames


def run(args) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from . import runtime

    # On a machine without a GPU the processes talk over gloo (accelerate's multi-CPU mode).
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    # torchrun (under accelerate launch) says how many processes share this machine.
    runtime.configure_threads(
        args.threads, processes_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    )
    started = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.jobs:
        jobs = read_jobs(args.jobs, args.output_dir, args.seed)
    else:
        jobs = clip_jobs(args.clips, args.output_dir, args.seed)

    device = state.device if args.device != "cpu" else torch.device("cpu")
    if args.device == "cuda" and device.type != "cuda":
        raise ArgumentError("device", "cuda was asked for but no CUDA GPU is available")
    args.dtype = runtime.resolve_dtype(args.dtype, device)  # a bad choice is said before any job is read
    skipped = [Result(job.index, job.output, "skipped") for job in jobs if os.path.exists(job.output)]
    pending = [job for job in jobs if not os.path.exists(job.output)]
    batches = plan_batches(pending, args.batch_size)

    board = ProgressBoard(args.output_dir, state.process_index, state.num_processes)
    bar = None
    if state.is_main_process:
        total = sum(estimated_frames(job) for job in pending)
        bar = tqdm(total=total, unit="frame", desc="generate-batch", dynamic_ncols=True, smoothing=0.1)
        if skipped:
            logger.info(f"{len(skipped)} of {len(jobs)} jobs are done already (their videos exist): skipped")
    share = Share(args, device, board, bar)
    with state.split_between_processes(batches) as mine:
        share.run(mine)
    board.post(share.jobs_done, share.frames_done, finished=True)
    if bar is not None:  # follow the other processes until all are finished
        board.follow(bar, "frames")
    everything = gather_object([asdict(r) for r in share.results])
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    board.remove()
    everything += [asdict(r) for r in skipped]
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
    write_summary(args.output_dir, {"summary": summary, "jobs": sorted(everything, key=lambda r: r["index"])})
    print_summary(summary, everything)
    return 1 if counts["failed"] else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), interrupted="finished videos are kept, none is half-written")


if __name__ == "__main__":
    sys.exit(main())
