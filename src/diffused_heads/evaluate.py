"""Measure how well a model moves the mouth with the speech and keeps the face, on held-out clips.

    diffused-heads evaluate --data prepared/ --model tuned --output-dir eval-tuned       # real clips
    accelerate launch -m diffused_heads evaluate --data prepared/ --model tuned --output-dir eval-tuned
    diffused-heads evaluate --compare eval-crema eval-tuned
    diffused-heads evaluate --data data/eval --steps 10                                   # drawn clips

**Real clips** (a prepared dataset, `dataset`): every clip of the `--split` (test) is regenerated from its first
frame and its speech (over the processes of `accelerate launch`; resumable) or taken from `--generated`, and
measured with the face mesh against its ground truth (`measures`): sync with the speech and its offset, LMD,
PSNR and SSIM over the frame and outside the mouth, blinks, head jitter. Results: `clips.csv`, a CSV per clip,
`summary.csv` and `summary.json` (mean ± 95% interval) in `--output-dir`.

**Drawn clips** (made by `diffused-heads make-dataset --split eval`: identities and voices not used in
training): the model animates the clip's first frame with the clip's speech. Reported per clip and on average:

- `r(gen, env)`: Pearson correlation between the mouth opening measured on the generated frames and the
  speech loudness envelope;
- `r(gt, env)`: the same on the ground-truth frames (what a perfect model would get);
- `r(gen, gt)`: between the generated and ground-truth mouth openings;
- `psnr_id`: PSNR (dB) of the generated frames against the identity frame outside the mouth region (how well
  the face is kept), with the same figure for the ground-truth frames, which move, blink and talk.

The mouth opening of a drawn frame is measured in the mouth region of the clip (the union of its mouth boxes,
widened): the amount of pixels of the colour of the inside of the drawn mouth.
"""

import argparse
import glob
import json
import os
import sys

from .cli_utils import DTYPE_CHOICES, SCHEDULER_CHOICES, HelpFormatter, run_command
from .errors import ArgumentError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads evaluate",
        description="Lip-sync, identity and motion figures of a model on held-out clips: the test split of a "
        "prepared dataset (real clips, measured with the face mesh; runs under accelerate launch) or synthetic "
        "drawn clips.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        help="pipeline folder, Hub id or built-in name (default: the built-in demo model); on drawn clips "
        "repeatable: each further model (a distilled student, say) joins a sweep as its own line at its own "
        "steps, or is measured beside the first",
    )
    parser.add_argument(
        "--data",
        help="a prepared dataset (prepare-dataset; its --split is regenerated and measured), or a folder made by "
        "diffused-heads make-dataset --split eval (drawn faces)",
    )
    parser.add_argument("--split", choices=("test", "train", "all"), default="test", help="with a prepared dataset")
    parser.add_argument(
        "--generated",
        help="with a prepared dataset: measure these clips (ID.npy or ID.mp4 per clip, e.g. another model's "
        "videos) instead of generating",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("RESULTS_A", "RESULTS_B"),
        help="print two result folders (--output-dir of earlier runs) side by side",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to generate")
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
    if args.compare:
        return args
    if not args.data:
        parser.error("--data is needed (or --compare RESULTS_A RESULTS_B)")
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
    args.models = args.model or [None]
    args.model = args.models[0]
    return args


def run_prepared(args, options) -> int:
    from . import runtime
    from .dataset import PreparedDataset
    from .evaluation import REAL_MEASURES, PreparedEvaluation, evaluate_prepared, print_summary, write_sweep

    if len(args.models) > 1:
        raise ArgumentError(
            "model",
            "is given more than once; on a prepared dataset evaluate each model to its own --output-dir and "
            "put them side by side with --compare",
        )
    if not args.output_dir:
        raise ArgumentError("output_dir", "is needed with a prepared dataset: the results go there")
    data = PreparedDataset(args.data, None if args.split == "all" else args.split)
    clips = data.clips[: args.num_clips] if args.num_clips else data.clips
    if not clips:
        raise ArgumentError("data", f"{args.data} has no clips in its {args.split} split")
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = None
    if args.generated is None:
        device = runtime.resolve_device(args.device)
        pipe = runtime.load_pipeline(args.model, device, runtime.resolve_dtype(args.dtype, device))
        pipe = runtime.with_scheduler(pipe, args.scheduler, **options)
        pipe.set_progress_bar_config(disable=True)
    settings = PreparedEvaluation(
        data=args.data,
        split=args.split,
        model=args.model,
        generated=args.generated,
        seed=args.seed,
        stabilize_every=args.stabilize_every,
    )
    if args.schedulers or (args.steps and len(args.steps) > 1):
        if pipe is None:
            raise ArgumentError("generated", "measures given clips; a sweep generates its own")
        steps_list = args.steps or [runtime.default_steps(pipe)]
        rows = []
        for name in args.schedulers or ["own" if args.scheduler is None else args.scheduler]:
            sampler = runtime.with_scheduler(pipe, None if name == "own" else name)
            for steps in steps_list:
                folder = os.path.join(args.output_dir, "sweep", f"{name}-{steps}")
                os.makedirs(folder, exist_ok=True)
                _, summary, seconds = evaluate_prepared(settings, sampler, data, clips, folder, steps, name)
                row = {"scheduler": name, "steps": steps, **{k: v[0] for k, v in summary.items()}}
                rows.append({**row, "seconds_per_frame": seconds})
                print(
                    f"{name:>9} {steps:>4} steps: {seconds:.3f} s/frame, sync r {row['gen_sync_r']:+.3f}, "
                    f"LMD {row['gen_lmd_px']:.2f} px, SSIM outside the mouth {row['gen_ssim_outside_mouth']:.3f}"
                )
        table, picture = write_sweep(rows, args.output_dir, REAL_MEASURES)
        print(f"Wrote {table} and {picture} ({len(rows)} samplers x steps, {len(clips)} clips)")
        return 0
    steps = args.steps[0] if args.steps else (runtime.default_steps(pipe) if pipe is not None else None)
    rows, summary, _ = evaluate_prepared(settings, pipe, data, clips, args.output_dir, steps, args.scheduler)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print_summary(summary, len(rows), sum(r["frames"] for r in rows))
        print(f"Wrote {args.output_dir}: clips.csv, summary.csv, summary.json and a CSV per clip in clips/")
    return 0


def run(args) -> int:
    from . import runtime
    from .dataset import is_prepared
    from .evaluation import compare, drawn_summary_text, evaluate, model_name, sweep, write_sweep

    if args.compare:
        return compare(*args.compare)
    runtime.configure_threads()
    options = {}
    for key, value in (option.split("=", 1) for option in args.scheduler_option):
        try:
            options[key] = json.loads(value)  # numbers and booleans
        except ValueError:
            options[key] = value
    if is_prepared(args.data):
        return run_prepared(args, options)
    if args.generated:
        raise ArgumentError("generated", "needs a prepared dataset as --data")
    stems = sorted(p[: -len(".json")] for p in glob.glob(os.path.join(args.data, "*.json")))
    stems = [s for s in stems if os.path.exists(s + ".mp4") and os.path.exists(s + ".wav")]
    if not stems:
        raise ArgumentError("data", f"{args.data} holds no clips (NAME.mp4 + NAME.wav + NAME.json)")
    if args.num_clips:
        stems = stems[: args.num_clips]
    device = runtime.resolve_device(args.device)
    dtype = runtime.resolve_dtype(args.dtype, device)  # (said once for all the models)
    pipes = [runtime.load_pipeline(model, device, dtype) for model in args.models]
    pipe = runtime.with_scheduler(pipes[0], args.scheduler, **options)
    for model in pipes:
        model.set_progress_bar_config(disable=True)
    names = [model_name(model) for model in args.models]
    if args.schedulers or (args.steps and len(args.steps) > 1):
        steps_list = args.steps or [runtime.default_steps(pipe)]
        schedulers = args.schedulers or ["own" if args.scheduler is None else args.scheduler]
        others = tuple(zip(names[1:], pipes[1:]))
        rows = sweep(pipe, stems, schedulers, steps_list, args.seed, args.stabilize_every, others=others)
        table, picture = write_sweep(rows, args.output_dir)
        print(f"Wrote {table} and {picture} ({len(rows)} settings, {len(stems)} clips)")
        return 0
    results = []
    for index, (name, model) in enumerate(zip(names, [pipe, *pipes[1:]])):
        steps = args.steps[0] if args.steps and index == 0 else runtime.default_steps(model)
        log = print if len(pipes) == 1 else (lambda message: None)
        rows, summary = evaluate(model, stems, steps, args.seed, log=log, stabilize_every=args.stabilize_every)
        print(drawn_summary_text(name, model, steps, summary))
        results.append({"model": name, "steps": steps, "summary": summary, "clips": rows})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            single = {"summary": results[0]["summary"], "clips": results[0]["clips"]} if len(results) == 1 else {}
            json.dump({"args": vars(args), **single, "models": results}, f, indent=1)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
