"""Peak memory of `diffused-heads train` against the number of clips in the prepared dataset, in one run.

    python benchmarks/bench_train_memory.py                   # 50 and 500 clips of 2 s at 128 px
    python benchmarks/bench_train_memory.py --clips 50 500 2000 --steps 20

Each dataset is written straight in the prepared format (random frames and speech-like noise; what is
measured is reading, not learning), then the built-in model is fine-tuned on it for a few steps in a fresh
process (frozen encoder: its embeddings are computed once per clip and kept on disk; frames are read by
DataLoader workers and resized from 128 to the model's 48 px). Printed per size: the peak resident memory of
the training process and of its largest worker, and what holding the frames in memory (at 48 px, as training
did before it streamed them) would take on top.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from diffused_heads import builtin_model_path, dataset

CHILD = """
import json, resource, sys, time
from diffused_heads.train import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def write_dataset(folder: str, clips: int, frames: int, size: int) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for index in range(clips):
        name = f"clip{index:05d}"
        writer = dataset.ClipWriter(folder, name, frames, size)
        base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for k in range(frames):
            writer.write_frame(np.roll(base, k, axis=0))
        audio = (0.1 * rng.standard_normal(frames * 640)).astype(np.float32)
        boxes = np.tile(np.array([[0.35, 0.65, 0.65, 0.8]], np.float32) * size, (frames, 1))
        writer.close(audio, boxes)
        entries.append({"id": name, "frames": frames, "speaker": f"s{index % 20}", "split": "train"})
    dataset.write_manifest(folder, size, entries, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--frames", type=int, default=50, help="frames per clip (2 s)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for count in args.clips:
            folder = os.path.join(work, f"data-{count}")
            write_dataset(folder, count, args.frames, args.size)
            command = [sys.executable, "-c", CHILD, "--data", folder, "--init-from", builtin_model_path()]
            command += ["--output-dir", os.path.join(work, f"model-{count}"), "--max-steps", str(args.steps)]
            command += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
            command += ["--checkpoint-every", str(args.steps * 10), "--log-every", str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(result.stderr[-3000:])
            report = json.loads(result.stdout.strip().splitlines()[-1])
            held = count * args.frames * 48 * 48 * 3 / 2**20
            rows.append((count, report["peak_mb"], report["worker_peak_mb"], held, report["seconds"]))
    print(f"{'clips':>6} {'train peak MB':>14} {'worker peak MB':>15} {'frames in memory MB':>20} {'seconds':>8}")
    for count, peak, worker, held, seconds in rows:
        print(f"{count:>6} {peak:>14.0f} {worker:>15.0f} {held:>20.0f} {seconds:>8.1f}")
    first = rows[0]
    for count, peak, worker, _, _ in rows[1:]:
        print(
            f"{count} vs {first[0]} clips: training process {peak / first[1]:.2f}x, "
            f"largest worker {worker / first[2]:.2f}x"
        )


if __name__ == "__main__":
    main()
