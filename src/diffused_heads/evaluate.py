"""Measure how well a model moves the mouth with the speech and keeps the face, on synthetic clips.

    diffused-heads evaluate --data data/eval --steps 10

For every clip of `--data` (made by `diffused-heads make-dataset --split eval`: identities and voices not
used in training) the model animates the clip's first frame with the clip's speech. Reported per clip and
on average:

- `r(gen, env)`: Pearson correlation between the mouth opening measured on the generated frames and the
  speech loudness envelope;
- `r(gt, env)`: the same on the ground-truth frames (what a perfect model would get);
- `r(gen, gt)`: between the generated and ground-truth mouth openings;
- `psnr_id`: PSNR (dB) of the generated frames against the identity frame outside the mouth region (how well
  the face is kept), with the same figure for the ground-truth frames, which move, blink and talk.

The mouth opening of a frame is measured in the mouth region of the clip (the union of its mouth boxes,
widened): the amount of pixels of the colour of the inside of the drawn mouth.
"""

import argparse
import csv
import glob
import json
import os
import sys
import time
from typing import List, Tuple

import numpy as np
import torch

from .cli_utils import DTYPE_CHOICES, SCHEDULER_CHOICES, HelpFormatter, run_command
from .errors import ArgumentError, MissingExtra
from .media import load_audio, read_video
from .synthetic_data import MOUTH_INSIDE, speech_envelope


def mouth_opening(frames: np.ndarray, region) -> np.ndarray:
    """Per-frame mouth opening of `(F, H, W, 3)` frames in [0, 1]: the mean, over the region, of how close each
    pixel is to the colour of the inside of the mouth (1 at that colour, 0 beyond a distance of 0.3)."""
    x0, y0, x1, y1 = region
    crop = frames[:, y0:y1, x0:x1].astype(np.float64)
    distance = np.linalg.norm(crop - np.array(MOUTH_INSIDE) / 255.0, axis=-1)
    return np.clip(1.0 - distance / 0.3, 0.0, 1.0).mean(axis=(1, 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def psnr_outside(frames: np.ndarray, reference: np.ndarray, region) -> float:
    """PSNR (dB) of frames in [0, 1] against one reference frame, ignoring the mouth region."""
    mask = np.ones(reference.shape[:2], bool)
    x0, y0, x1, y1 = region
    mask[y0:y1, x0:x1] = False
    mse = ((frames - reference[None]) ** 2)[:, mask].mean()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def mouth_region(boxes, source_size: float, size: int):
    """The union of mouth `boxes` (`[x0, y0, x1, y1]` in pixels of a `source_size` frame; one box or one per
    frame), widened by 6% of the size on every side, in pixels of a `size` frame."""
    boxes = np.atleast_2d(np.asarray(boxes, np.float64)) * size / source_size
    margin = 0.06 * size
    return (
        int(max(0, np.floor(boxes[:, 0].min() - margin))),
        int(max(0, np.floor(boxes[:, 1].min() - margin))),
        int(min(size, np.ceil(boxes[:, 2].max() + margin))),
        int(min(size, np.ceil(boxes[:, 3].max() + margin))),
    )


def read_clip(stem: str, size: int):
    """Ground-truth frames `(F, size, size, 3)` in [0, 1] (decoded as for training), the 16 kHz speech and the
    clip's mouth region at `size`."""
    frames = read_video(stem + ".mp4", size).astype(np.float32) / 255.0
    with open(stem + ".json", encoding="utf-8") as f:
        info = json.load(f)
    waveform = load_audio(stem + ".wav")
    return frames, waveform, mouth_region(info["mouth_boxes"], info["size"], size)


def evaluate(pipe, stems, steps: int, seed: int = 0, log=print, stabilize_every=None):
    size = pipe.unet.config.sample_size
    rows = []
    for stem in stems:
        frames, waveform, region = read_clip(stem, size)
        started = time.perf_counter()
        generated = pipe(
            frames[0],
            waveform,
            num_inference_steps=steps,
            stabilize_every=stabilize_every,
            generator=torch.Generator().manual_seed(seed),
        ).frames[0]
        seconds = time.perf_counter() - started  # generating only
        count = min(len(generated), len(frames))
        generated, frames = generated[:count], frames[:count]
        envelope = speech_envelope(waveform, count)
        gen_open, gt_open = mouth_opening(generated, region), mouth_opening(frames, region)
        row = {
            "clip": os.path.basename(stem),
            "frames": count,
            "r_gen_env": pearson(gen_open, envelope),
            "r_gt_env": pearson(gt_open, envelope),
            "r_gen_gt": pearson(gen_open, gt_open),
            "psnr_id_gen": psnr_outside(generated, frames[0], region),
            "psnr_id_gt": psnr_outside(frames, frames[0], region),
            "seconds": seconds,
        }
        rows.append(row)
        log(
            f"{row['clip']}: r(gen,env) {row['r_gen_env']:+.3f}  r(gt,env) {row['r_gt_env']:+.3f}  "
            f"r(gen,gt) {row['r_gen_gt']:+.3f}  "
            f"psnr_id gen {row['psnr_id_gen']:.1f} dB / gt {row['psnr_id_gt']:.1f} dB"
        )
    keys = ("r_gen_env", "r_gt_env", "r_gen_gt", "psnr_id_gen", "psnr_id_gt")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary.update(clips=len(rows), frames=int(sum(r["frames"] for r in rows)))
    return rows, summary


MEASURES = (
    ("r_gen_env", "mouth opening vs loudness (r)", "r_gt_env"),
    ("r_gen_gt", "mouth vs ground-truth mouth (r)", None),
    ("psnr_id_gen", "identity PSNR outside the mouth (dB)", "psnr_id_gt"),
)


def sweep(pipe, stems, schedulers: List[str], steps_list: List[int], seed: int = 0, stabilize_every=None, log=print):
    """Every sampler at every step count on the same clips: one row each with the summary figures and the seconds
    of generating per frame, measured in this run."""
    from . import runtime

    rows = []
    for name in schedulers:
        sampler = runtime.with_scheduler(pipe, None if name == "own" else name)
        for steps in steps_list:
            clips, summary = evaluate(
                sampler, stems, steps, seed, log=lambda message: None, stabilize_every=stabilize_every
            )
            row = {"scheduler": name, "steps": steps, **summary}
            row["seconds_per_frame"] = sum(c["seconds"] for c in clips) / max(1, summary["frames"])
            rows.append(row)
            log(
                f"{name:>9} {steps:>4} steps: {row['seconds_per_frame']:.3f} s/frame, r(gen,env) "
                f"{row['r_gen_env']:+.3f}, r(gen,gt) {row['r_gen_gt']:+.3f}, identity {row['psnr_id_gen']:.1f} dB"
            )
    return rows


def write_sweep(rows: List[dict], folder: str) -> Tuple[str, str]:
    """`sweep.csv` and `sweep.png` (each measure against seconds per frame, a line per sampler, the ground
    truth's value as a dashed line) in `folder`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra('the plot needs matplotlib: pip install "diffused-heads-diffusers[test]"') from None
    os.makedirs(folder, exist_ok=True)
    table = os.path.join(folder, "sweep.csv")
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4))
    for axis, (key, label, reference) in zip(axes, MEASURES):
        for name in dict.fromkeys(r["scheduler"] for r in rows):
            points = sorted((r["seconds_per_frame"], r[key], r["steps"]) for r in rows if r["scheduler"] == name)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            for x, y, steps in points:
                axis.annotate(str(steps), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if reference:
            axis.axhline(rows[0][reference], color="grey", linestyle="--", label="ground truth")
        axis.set_xscale("log")
        axis.set_xlabel("seconds per frame (this machine)")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    picture = os.path.join(folder, "sweep.png")
    figure.savefig(picture, dpi=110)
    plt.close(figure)
    return table, picture


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads evaluate",
        description="Lip-sync and identity figures of a model on synthetic evaluation clips.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", help="pipeline folder (default: the built-in demo model)")
    parser.add_argument("--data", required=True, help="folder made by diffused-heads make-dataset --split eval")
    parser.add_argument(
        "--steps", help="denoising steps per frame, or a comma-separated list for a sweep (default: the model's own)"
    )
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, help="default: the model's own")
    parser.add_argument(
        "--schedulers",
        help="a comma-separated list of samplers to sweep (of: own, " + ", ".join(SCHEDULER_CHOICES) + ")",
    )
    parser.add_argument("--output-dir", help="a sweep's sweep.csv and sweep.png go here (needed for a sweep)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="UNet precision (auto: bfloat16 where native)"
    )
    parser.add_argument(
        "--scheduler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one entry of the scheduler config, e.g. variance_type=learned_range or "
        "timestep_spacing=linspace (repeatable)",
    )
    parser.add_argument("--num-clips", type=int, help="evaluate only the first N clips")
    parser.add_argument("--stabilize-every", type=int, metavar="N", help="as for generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the per-clip rows and the summary to this file")
    args = parser.parse_args(argv)
    for option in args.scheduler_option:
        if "=" not in option:
            parser.error(f"--scheduler-option takes KEY=VALUE, got {option!r}")
    try:
        args.steps = [int(v) for v in args.steps.split(",")] if args.steps else None
    except ValueError:
        parser.error(f"--steps takes whole numbers separated by commas, got {args.steps!r}")
    if args.steps and min(args.steps) < 1:
        parser.error("--steps must be at least 1")
    if args.schedulers:
        args.schedulers = [v.strip() for v in args.schedulers.split(",") if v.strip()]
        unknown = [v for v in args.schedulers if v not in ("own", *SCHEDULER_CHOICES)]
        if unknown:
            parser.error(f"--schedulers: unknown {unknown}; choose from own, {', '.join(SCHEDULER_CHOICES)}")
    if (args.schedulers or (args.steps and len(args.steps) > 1)) and not args.output_dir:
        parser.error("a sweep (--schedulers, or several --steps) writes its table and plot to --output-dir")
    return args


def run(args) -> int:
    from . import runtime
    from .hub.pipeline_diffused_heads import scheduler_uses_variance

    runtime.configure_threads()
    stems = sorted(p[: -len(".json")] for p in glob.glob(os.path.join(args.data, "*.json")))
    stems = [s for s in stems if os.path.exists(s + ".mp4") and os.path.exists(s + ".wav")]
    if not stems:
        raise ArgumentError("data", f"{args.data} holds no clips (NAME.mp4 + NAME.wav + NAME.json)")
    if args.num_clips:
        stems = stems[: args.num_clips]
    options = {}
    for key, value in (option.split("=", 1) for option in args.scheduler_option):
        try:
            options[key] = json.loads(value)  # numbers and booleans
        except ValueError:
            options[key] = value
    pipe = runtime.load_pipeline(args.model, "cpu", args.dtype)
    pipe = runtime.with_scheduler(pipe, args.scheduler, **options)
    if args.schedulers or (args.steps and len(args.steps) > 1):
        steps_list = args.steps or [runtime.default_steps(pipe)]
        schedulers = args.schedulers or ["own" if args.scheduler is None else args.scheduler]
        rows = sweep(pipe, stems, schedulers, steps_list, args.seed, args.stabilize_every)
        table, picture = write_sweep(rows, args.output_dir)
        print(f"Wrote {table} and {picture} ({len(rows)} samplers x steps, {len(stems)} clips)")
        return 0
    steps = args.steps[0] if args.steps else runtime.default_steps(pipe)
    rows, summary = evaluate(pipe, stems, steps, args.seed, stabilize_every=args.stabilize_every)
    config = pipe.scheduler.config
    sampler = f"{type(pipe.scheduler).__name__} (timestep_spacing {config.timestep_spacing}"
    uses_variance = scheduler_uses_variance(pipe.scheduler) or "DDPM" in sampler
    sampler += f", variance_type {config.variance_type})" if uses_variance else ")"
    print(
        f"\n{summary['clips']} clips, {summary['frames']} frames, {sampler} {steps} steps:\n"
        f"  mouth vs speech envelope  r = {summary['r_gen_env']:.3f} (ground truth {summary['r_gt_env']:.3f})\n"
        f"  generated vs ground-truth mouth  r = {summary['r_gen_gt']:.3f}\n"
        f"  identity kept outside the mouth: PSNR {summary['psnr_id_gen']:.1f} dB "
        f"(ground truth {summary['psnr_id_gt']:.1f} dB)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "summary": summary, "clips": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
