"""Memory and time of `diffused-heads generate` against the length of the speech, in one run.

    python benchmarks/bench_long.py                      # 10 s, 60 s and 300 s of speech, the model's own steps
    python benchmarks/bench_long.py --steps 1            # the same memory figures in a fraction of the time

Each length runs in a fresh process (the built-in model, the example face, the example sentence repeated with
short pauses), which reports its peak resident memory. Printed per length: peak memory, its growth over the
shortest length, seconds of generating per second of speech, and audio/video sync at the end of the file
(the end of the last frame against the end of the audio track, in milliseconds).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import av
import numpy as np
import soundfile

from diffused_heads import example_audio_path

CHILD = """
import json, resource, sys, time
from diffused_heads.generate import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def speech_file(seconds: float, folder: str) -> str:
    example, rate = soundfile.read(example_audio_path(), dtype="float32")
    clip = np.concatenate([example, np.zeros(int(0.3 * rate), np.float32)])
    total = int(seconds * rate)
    path = os.path.join(folder, f"speech-{seconds:g}s.wav")
    soundfile.write(path, np.tile(clip, total // len(clip) + 1)[:total], rate)
    return path


def sync_ms(path: str) -> float:
    """The end of the last video frame minus the end of the audio track, as the file's header gives them (what a
    player goes by; decoding AAC also returns the padding of its last 1024-sample packet), in milliseconds."""
    with av.open(path) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video))
        return (frames / float(video.average_rate) - float(audio.duration * audio.time_base)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="10,60,300", help="seconds of speech, comma-separated")
    parser.add_argument("--steps", type=int, help="denoising steps per frame (default: the model's own)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--dtype", default="auto", help="UNet precision of each run (auto: bfloat16 where native)")
    args = parser.parse_args()
    lengths = [float(v) for v in args.lengths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seconds in lengths:
            output = os.path.join(folder, f"out-{seconds:g}.mp4")
            command = [sys.executable, "-c", CHILD, "--audio", speech_file(seconds, folder), "--output", output]
            command += ["--threads", str(args.threads), "--dtype", args.dtype]
            command += ["--steps", str(args.steps)] if args.steps else []
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"the run of {seconds:g} s failed:\n{result.stderr[-2000:]}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((seconds, measured["peak_mb"], measured["seconds"] / seconds, sync_ms(output)))
            print(f"{seconds:g} s done", file=sys.stderr, flush=True)
    steps = args.steps or "the model's own"
    print(f"\nbuilt-in model, {steps} steps per frame, {args.dtype}, {args.threads} thread(s)\n")
    print(f"{'speech':>8}  {'peak memory':>12}  {'growth':>8}  {'s per s of speech':>18}  {'A/V sync at the end':>20}")
    for seconds, peak, rate, sync in rows:
        print(f"{seconds:>7g}s  {peak:>9.0f} MB  {peak - rows[0][1]:>+6.0f} MB  {rate:>18.2f}  {sync:>17.1f} ms")


if __name__ == "__main__":
    main()
