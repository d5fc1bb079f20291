"""Where the seconds before the first frame go: `diffused-heads generate` on the built-in default model, in phases.

    python benchmarks/bench_startup.py [--runs 3] [--model builtin-fast]

Each run is a fresh Python process (nothing cached in memory) that goes through what `generate` does, timing each
phase: the interpreter's start, importing torch, importing diffusers and the package's pipeline, loading the model,
reading the example face and sentence, the first frame (its first UNet calls, which carry one-time set-up) and the
frames after it. The imports are also measured by Python's `-X importtime` and their time is summed by the top-level
package it is spent in, to say whose the seconds are. `diffused-heads generate --help` is timed too (it must not
import torch). Medians over the runs are printed; figures vary with the machine's load.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PHASES = """
import json, sys, time
times = {"start": time.perf_counter()}
import torch
times["torch"] = time.perf_counter()
import diffusers  # noqa: F401
from diffusers import DiffusionPipeline  # noqa: F401
from diffused_heads import example_audio_path, example_image_path, runtime
from diffused_heads.media import SAMPLING_RATE, load_audio, load_identity_frame
times["diffusers and the pipeline"] = time.perf_counter()
runtime.configure_threads()
pipe = runtime.load_pipeline(MODEL, "cpu", "auto")
times["loading the model"] = time.perf_counter()
identity = load_identity_frame(example_image_path())
audio = load_audio(example_audio_path())
times["reading the face and speech"] = time.perf_counter()
frames = pipe.stream(identity, audio, sampling_rate=SAMPLING_RATE, generator=torch.Generator().manual_seed(0))
next(frames)
times["the first frame"] = time.perf_counter()
count = sum(1 for _ in frames)
times["the other frames"] = time.perf_counter()
times["frames"] = count
print(json.dumps(times))
"""


def interpreter_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def one_run(model):
    code = PHASES.replace("MODEL", repr(model))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    ended = time.perf_counter()
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    times = json.loads(result.stdout.strip().splitlines()[-1])
    phases, previous = {}, times["start"]
    for name in ("torch", "diffusers and the pipeline", "loading the model", "reading the face and speech"):
        phases[name], previous = times[name] - previous, times[name]
    phases["the first frame"] = times["the first frame"] - previous
    frames = times["frames"]
    phases["per later frame"] = (times["the other frames"] - times["the first frame"]) / max(1, frames)
    phases["whole process"] = ended - started
    return phases, import_times(result.stderr)


def import_times(log: str):
    """Seconds of import time (self time, so nothing is counted twice) by top-level package."""
    totals = {}
    for line in log.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = [part.strip() for part in line[len("import time:") :].split("|")]
        if fields[0].startswith("self"):
            continue
        top = fields[2].split(".")[0]
        totals[top] = totals.get(top, 0.0) + int(fields[0]) / 1e6
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes to take the median of")
    parser.add_argument("--model", default="builtin-fast", help="the model to load (default: the built-in default)")
    args = parser.parse_args()
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; torch threads as generate chooses them")
    starts = [interpreter_start() for _ in range(args.runs)]
    helps = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffused_heads", "generate", "--help"], capture_output=True, check=True)
        helps.append(time.perf_counter() - started)
    runs = [one_run(args.model) for _ in range(args.runs)]
    print(f"\n{'phase':<32} {'seconds (median of ' + str(args.runs) + ')':>24}")
    print(f"{'Python starting':<32} {statistics.median(starts):>24.3f}")
    for name in runs[0][0]:
        print(f"{name:<32} {statistics.median(r[0][name] for r in runs):>24.3f}")
    print(f"{'generate --help (whole process)':<32} {statistics.median(helps):>24.3f}")
    packages = sorted({p for _, imports in runs for p in imports})
    totals = {p: statistics.median(imports.get(p, 0.0) for _, imports in runs) for p in packages}
    print("\nimport time by package (self time, median):")
    for package, seconds in sorted(totals.items(), key=lambda item: -item[1])[:12]:
        print(f"  {package:<30} {seconds:>8.3f} s")
    print(f"  {'(all)':<30} {sum(totals.values()):>8.3f} s")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(shown) or "no AVX2"


if __name__ == "__main__":
    main()
