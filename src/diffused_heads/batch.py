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
run's in the last float bits, which the frame loop amplifies (docs/batch.md), so `--batch-size 1` is the
setting that reproduces `generate`. Frames are written as they are made. A job whose output exists is skipped
(before any model is loaded); a job that fails is recorded with its error and the others go on. At the end the
main process writes the run's summary (`summary-NNN.json`, and `summary.json` for the latest run) in the output
folder and prints a table; the exit code is 1 if a job failed.
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import List

from .cli_utils import HelpFormatter, ProgressBoard, add_model_options, run_command
from .errors import ArgumentError

logger = logging.getLogger(__name__)


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
        help="clips generated at once in a process (1 reproduces generate exactly: see docs/batch.md)",
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


def run(args) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from . import runtime
    from .jobs import BatchRunner, BatchSettings, Result, clip_jobs, estimated_frames, plan_batches, read_jobs

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
    made = {"jobs": 0, "frames": 0}

    def job_ended(result) -> None:
        made["jobs"] += 1
        board.post(made["jobs"], made["frames"], every=0.5)

    def frame_made() -> None:
        made["frames"] += 1
        board.post(made["jobs"], made["frames"], every=0.5)
        if bar is not None:
            progress = board.read()
            bar.n = progress["frames"]
            bar.set_postfix(jobs=progress["jobs"], refresh=False)
            bar.refresh()

    settings = BatchSettings(
        model=args.model,
        dtype=args.dtype,
        compile=args.compile,
        scheduler=args.scheduler,
        steps=args.steps,
        stabilize_every=args.stabilize_every,
        prepare=not args.no_prepare,
        random_frame=args.random_frame,
        paste_back=args.paste_back,
        max_size=args.max_size,
        size=args.size,
    )
    runner = BatchRunner(settings, device, on_result=job_ended, on_frame=frame_made)
    with state.split_between_processes(batches) as mine:
        runner.run(mine)
    board.post(made["jobs"], made["frames"], finished=True)
    if bar is not None:  # follow the other processes until all are finished
        board.follow(bar, "frames")
    everything = gather_object([asdict(r) for r in runner.results])
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
