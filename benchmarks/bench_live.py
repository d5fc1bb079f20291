"""The live session at wall-clock pace: speech pushed in 20 ms chunks as a microphone gives it, frames taken at 25
per second, all in one run.

    python benchmarks/bench_live.py                       # 30 s, the built-in default model, dtype auto
    python benchmarks/bench_live.py --minutes 10          # the long run: memory a minute, drift of the frame time
    python benchmarks/bench_live.py --dtype float32 --threads 2

Turns of the example sentence (3.4 s) with 1 s of silence between them. Printed: the CPU's flags that matter, the
first-frame latency (first speech pushed -> its first frame out, beside the lookahead), per-frame latency (the moment
the speech a frame needs is in -> the frame made: p50, p95, max), the real-time factor (making time / video time),
the audio/video offset of the paced output (each frame's own audio against the speech at its place), frames dropped
while speaking and idle frames skipped, and resident memory each minute.
"""

import argparse
import resource
import threading
import time

import numpy as np
import torch

from diffused_heads import example_audio_path, example_image_path, runtime
from diffused_heads.live import LiveSession
from diffused_heads.media import load_audio, load_identity_frame


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    return " ".join(flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags) or "none"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or name (default: the built-in default)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--minutes", type=float, help="overrides --seconds")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one core is left to the feeder)")
    parser.add_argument("--chunk-ms", type=float, default=20.0)
    args = parser.parse_args()
    seconds = args.minutes * 60 if args.minutes else args.seconds
    torch.set_num_threads(args.threads)
    pipe = runtime.load_pipeline(args.model, device="cpu", dtype=args.dtype)
    speech = load_audio(example_audio_path())
    rate, chunk = 16000, int(16000 * args.chunk_ms / 1000)
    turn = np.concatenate([speech, np.zeros(rate, np.float32)])  # a turn, then 1 s of nobody speaking
    identity_image = load_identity_frame(example_image_path())
    session = LiveSession(pipe, identity_image).start()
    size = pipe.unet.config.sample_size
    identity = np.asarray(identity_image.resize((size, size)), np.float64)
    kept = []  # (minute, PSNR of the frame against the identity frame): how well the face holds over the run
    pushed_at = {}  # turn -> wall time of its first push
    stop = threading.Event()

    def feeder():  # a microphone: 20 ms every 20 ms of wall clock, the silences not sent (a voice activity gate)
        began, sent, turn_index = time.monotonic(), 0, 0
        while not stop.is_set() and sent < seconds * rate:
            position = sent % len(turn)
            if position < len(speech):
                piece = speech[position : position + chunk]
                if position == 0:
                    pushed_at[turn_index] = time.monotonic()
                session.push(piece)
                if position + chunk >= len(speech):
                    session.end_turn()
                    turn_index += 1
            sent += chunk
            time.sleep(max(0.0, began + sent / rate - time.monotonic()))

    feed = threading.Thread(target=feeder, daemon=True)
    frames, memory, next_minute = [], [(0.0, rss_mb())], 60.0
    started = time.monotonic()
    feed.start()
    while time.monotonic() - started < seconds + 1.0:
        frame = session.next_frame(timeout=30)
        frames.append((frame.index, frame.speaking, frame.made_at, frame.play_time, frame.audio))
        error = np.mean((np.asarray(frame.image, np.float64) - identity) ** 2)
        kept.append((int((time.monotonic() - started) // 60), 10 * np.log10(255.0**2 / max(error, 1e-10))))
        if time.monotonic() - started >= next_minute:
            memory.append((next_minute / 60, rss_mb()))
            next_minute += 60.0
    stop.set()
    session.close()

    lookahead_ms = session.lookahead_samples / rate * 1000
    hop = session.hop
    # Per frame: when the speech it needs was in. Frame f of a turn placed at sample s needs the turn's first
    # f * hop + lookahead - s samples, which the feeder had pushed (at real-time pace) that long after its start.
    latencies, offsets, first_latency = [], [], []
    starts = session.turn_starts
    for turn_index, start in enumerate(starts):
        if turn_index not in pushed_at:
            continue
        t0 = pushed_at[turn_index]
        for index, speaking, made_at, play_time, audio in frames:
            if not speaking or not start <= index * hop < start + len(speech):
                continue
            needed = min(index * hop + session.lookahead_samples - start, len(speech))
            chunks_needed = -(-needed // chunk)
            latencies.append(made_at - (t0 + chunks_needed * chunk / rate))
            expected = speech[index * hop - start : index * hop - start + hop]
            offsets.append(0.0 if np.allclose(audio[: len(expected)], expected, atol=1e-5) else np.nan)
        first = min((f for f in frames if f[1] and f[0] * hop >= start), key=lambda f: f[0], default=None)
        if first is not None:
            first_latency.append(first[3] - t0)
    made = [f for f in session.stats.frame_seconds]
    played = len(frames)
    latencies = np.array(latencies) * 1000
    print(
        f"CPU flags: {cpu_flags()}; torch threads {args.threads}; UNet dtype {pipe.unet.dtype}; "
        f"{pipe.config.get('num_inference_steps')} steps a frame"
    )
    print(f"played {played} frames over {seconds:.0f} s; {sum(f[1] for f in frames)} speaking")
    print(
        f"lookahead: {lookahead_ms:.0f} ms; lead of a turn: {session.lead_frames} frames "
        f"({session.lead_frames * 40} ms)"
    )
    print(
        f"first-frame latency (speech in -> its first frame out): mean {np.mean(first_latency) * 1000:.0f} ms, "
        f"max {np.max(first_latency) * 1000:.0f} ms over {len(first_latency)} turns"
    )
    print(
        f"per-frame latency (needed speech in -> frame made): p50 {np.percentile(latencies, 50):.0f} ms, "
        f"p95 {np.percentile(latencies, 95):.0f} ms, max {latencies.max():.0f} ms "
        f"(negative: made before its due time, from speech pushed early)"
    )
    print(
        f"making a frame: mean {np.mean(made) * 1000:.1f} ms, p95 {np.percentile(made, 95) * 1000:.1f} ms; "
        f"real-time factor {np.mean(made) / 0.04:.2f}"
    )
    print(
        "A/V offset: "
        + ("0 ms (each speaking frame carries its own 40 ms)" if not np.isnan(offsets).any() else "MISMATCH")
        + f" over {len(offsets)} frames"
    )
    print(
        f"late frames: {session.stats.late} (max {session.stats.max_late_s * 1000:.0f} ms); idle frames dropped to "
        f"catch up: {session.stats.skipped_idle}; speech frames dropped: 0 by design"
    )
    minutes = sorted({m for m, _ in kept})
    print(
        "the face against the identity frame (PSNR, dB; the mouth and small motion included) by minute: "
        + ", ".join(f"{m}: {np.mean([p for k, p in kept if k == m]):.1f}" for m in minutes)
    )
    print("memory (RSS, MB) by minute: " + ", ".join(f"{m:g}: {mb:.0f}" for m, mb in memory))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
