"""Clips per minute of `diffused-heads generate-batch` on the built-in model, for process counts and batch sizes.

    python benchmarks/bench_batch.py                      # 1 and 2 processes, batch sizes 1 and 4
    python benchmarks/bench_batch.py --jobs 16 --processes 1 2 4 --batch-sizes 1 8

Makes `--jobs` jobs from the built-in example face and sentence (cut to lengths between 1.2 and 2.0 s, so that
batches mix lengths), runs each setting in a fresh output folder and prints one row per setting. Several
processes are started with `accelerate launch --multi_gpu --num_processes N` (on a machine without a GPU they
run on the CPU and talk over gloo).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile

from diffused_heads import example_audio_path, example_image_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    speech, rate = soundfile.read(example_audio_path(), dtype="float32")
    with tempfile.TemporaryDirectory() as folder:
        rows = ["image,audio,output,seed"]
        for k in range(args.jobs):
            seconds = 1.2 + 0.8 * k / max(1, args.jobs - 1)
            soundfile.write(os.path.join(folder, f"speech{k}.wav"), speech[: int(seconds * rate)], rate)
            rows.append(f"{example_image_path()},speech{k}.wav,clip{k}.mp4,{k}")
        with open(os.path.join(folder, "jobs.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
        header = ("processes", 9), ("batch", 5), ("clips", 5), ("frames", 6), ("wall s", 7), ("clips/min", 9)
        print("  ".join(f"{name:>{width}}" for name, width in header) + "  frames/s")
        for processes in args.processes:
            for batch_size in args.batch_sizes:
                output = os.path.join(folder, f"out-{processes}-{batch_size}")
                command = ["-m", "diffused_heads", "generate-batch", "--jobs", "jobs.csv", "--output-dir", output]
                command += ["--batch-size", str(batch_size), "--steps", str(args.steps)]
                if processes == 1:
                    command = [sys.executable] + command
                else:
                    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)] + command
                started = time.perf_counter()
                result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
                wall = time.perf_counter() - started
                if result.returncode != 0:
                    print(result.stderr[-3000:])
                    sys.exit(result.returncode)
                with open(os.path.join(output, "summary.json")) as f:
                    summary = json.load(f)["summary"]
                print(
                    f"{processes:>9}  {batch_size:>5}  {summary['done']:>5}  {summary['frames']:>6}  {wall:>7.1f}  "
                    f"{60 * summary['done'] / wall:>9.2f}  {summary['frames'] / wall:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
