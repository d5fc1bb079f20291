"""Measures of a model on held-out clips: drawn clips (mouth against the speech envelope, the face kept outside the
mouth) and the clips of a prepared dataset (regenerated from their first frame and measured with the face mesh
against the ground truth, over the processes of `accelerate launch`, resumable), a sweep of samplers and steps,
and the results' files. `diffused-heads evaluate` parses its options and calls these."""

import csv
import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import ArgumentError, MissingExtra
from .measures import drawn_mouth_opening, drawn_mouth_region, mean_and_interval, outside_region, pearson, psnr
from .media import SAMPLES_PER_FRAME, VIDEO_EXTENSIONS, load_audio, read_video, resize_frames
from .synthetic_data import speech_envelope


def read_clip(stem: str, size: int):
    """Ground-truth frames `(F, size, size, 3)` in [0, 1] (decoded as for training), the 16 kHz speech and the
    clip's mouth region at `size`."""
    frames = read_video(stem + ".mp4", size).astype(np.float32) / 255.0
    with open(stem + ".json", encoding="utf-8") as f:
        info = json.load(f)
    waveform = load_audio(stem + ".wav")
    return frames, waveform, drawn_mouth_region(info["mouth_boxes"], info["size"], size)


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
        gen_open, gt_open = drawn_mouth_opening(generated, region), drawn_mouth_opening(frames, region)
        outside = outside_region(size, region)
        row = {
            "clip": os.path.basename(stem),
            "frames": count,
            "r_gen_env": pearson(gen_open, envelope),
            "r_gt_env": pearson(gt_open, envelope),
            "r_gen_gt": pearson(gen_open, gt_open),
            "psnr_id_gen": psnr(generated, frames[0], outside),
            "psnr_id_gt": psnr(frames, frames[0], outside),
            "seconds": seconds,
        }
        rows.append(row)
        log(
            f"{row['clip']}: r(gen,env) {row['r_gen_env']:+.3f}  r(gt,env) {row['r_gt_env']:+.3f}  "
            f"r(gen,gt) {row['r_gen_gt']:+.3f}  "
            f"psnr_id gen {row['psnr_id_gen']:.1f} dB / gt {row['psnr_id_gt']:.1f} dB"
        )
    summary = {}
    for key in DRAWN_KEYS:
        summary[key], summary[key + "_ci95"] = mean_and_interval([r[key] for r in rows])
    summary.update(clips=len(rows), frames=int(sum(r["frames"] for r in rows)))
    return rows, summary


# The measures of a drawn clip; each summary has its mean and, as `KEY_ci95`, the half-width of its 95% interval.
DRAWN_KEYS = ("r_gen_env", "r_gt_env", "r_gen_gt", "psnr_id_gen", "psnr_id_gt")


MEASURES = (
    ("r_gen_env", "mouth opening vs loudness (r)", "r_gt_env"),
    ("r_gen_gt", "mouth vs ground-truth mouth (r)", None),
    ("psnr_id_gen", "identity PSNR outside the mouth (dB)", "psnr_id_gt"),
)


def sweep(
    pipe,
    stems,
    schedulers: List[str],
    steps_list: List[int],
    seed: int = 0,
    stabilize_every=None,
    log=print,
    others: Tuple[Tuple[str, object], ...] = (),
):
    """Every sampler at every step count on the same clips: one row each with the summary figures and the seconds
    of generating per frame, measured in this run. `others` are further `(name, pipeline)` models (students, for
    example), one row each at their own sampler and steps."""
    from . import runtime

    samplers = [(name, runtime.with_scheduler(pipe, None if name == "own" else name)) for name in schedulers]
    settings = [(name, sampler, steps) for name, sampler in samplers for steps in steps_list]
    settings += [(name, model, runtime.default_steps(model)) for name, model in others]
    rows = []
    for name, sampler, steps in settings:
        quiet = lambda message: None  # noqa: E731
        clips, summary = evaluate(sampler, stems, steps, seed, log=quiet, stabilize_every=stabilize_every)
        row = {"scheduler": name, "steps": steps, **summary}
        row["seconds_per_frame"] = sum(c["seconds"] for c in clips) / max(1, summary["frames"])
        rows.append(row)
        log(
            f"{name:>9} {steps:>4} steps: {row['seconds_per_frame']:.3f} s/frame, r(gen,env) "
            f"{row['r_gen_env']:+.3f}, r(gen,gt) {row['r_gen_gt']:+.3f}, identity {row['psnr_id_gen']:.1f} dB"
        )
    return rows


def write_sweep(rows: List[dict], folder: str, measures=MEASURES) -> Tuple[str, str]:
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
    figure, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4))
    for axis, (key, label, reference) in zip(axes, measures):
        for name in dict.fromkeys(r["scheduler"] for r in rows):
            points = sorted(
                (r["seconds_per_frame"], r[key], r["steps"], r.get(key + "_ci95", float("nan")))
                for r in rows
                if r["scheduler"] == name
            )
            intervals = [p[3] if np.isfinite(p[3]) else 0.0 for p in points]
            axis.errorbar(
                [p[0] for p in points], [p[1] for p in points], yerr=intervals, marker="o", capsize=2, label=name
            )
            for x, y, steps, _ in points:
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


# --------------------------------------------------------------------------------------------------
# Real clips: a prepared dataset's test split, measured with the face mesh

GENERATED = "generated"
CLIPS_FOLDER = "clips"
# Per clip, measured on the generated clip and on the ground truth alike.
OWN_MEASURES = ("sync_r", "sync_offset", "sync_r_best", "blinks_per_s", "blink_s", "head_jitter_px", "face_found")
REAL_MEASURES = (
    ("gen_sync_r", "mouth opening vs loudness (r)", "gt_sync_r"),
    ("gen_lmd_px", "mouth landmark distance (px)", None),
    ("gen_ssim_outside_mouth", "SSIM outside the mouth", None),
    ("gen_blinks_per_s", "blinks per second", "gt_blinks_per_s"),
)


def _save_array(path: str, array: np.ndarray) -> None:
    np.save(path + ".partial.npy", array)
    os.replace(path + ".partial.npy", path)


def generate_clips(pipe, data, clips, folder: str, steps: int, seed: int, stabilize_every, state, bar=None) -> None:
    """Regenerate each clip (this process's share) from its first frame and its speech into
    `folder/ID.npy` (uint8 frames at the model's size) with `ID.json` (frames, seconds); clips already there are
    kept, so a run resumes."""
    os.makedirs(folder, exist_ok=True)
    pending = [c for c in clips if not os.path.isfile(os.path.join(folder, c.id + ".npy"))]
    size = pipe.unet.config.sample_size
    with state.split_between_processes(pending) as mine:
        for clip in mine:
            identity = resize_frames(data.frame(clip, 0)[None], size)[0]
            started = time.perf_counter()
            frames = pipe(
                identity,
                data.audio(clip),
                num_inference_steps=steps,
                stabilize_every=stabilize_every,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            ).frames[0]
            seconds = time.perf_counter() - started
            with open(os.path.join(folder, clip.id + ".json"), "w", encoding="utf-8") as f:
                json.dump({"frames": len(frames), "seconds": seconds}, f)
            _save_array(os.path.join(folder, clip.id + ".npy"), (frames * 255.0).round().clip(0, 255).astype(np.uint8))
            if bar is not None:
                bar.update()


def read_generated(folder: str, clip, size: int) -> np.ndarray:
    """A clip's generated frames: `ID.npy` (uint8 `(F, S, S, 3)`) or a video `ID.*` (centre-cropped, resized)."""
    path = os.path.join(folder, clip.id + ".npy")
    if os.path.isfile(path):
        return resize_frames(np.load(path), size)
    for extension in sorted(VIDEO_EXTENSIONS):
        if os.path.isfile(os.path.join(folder, clip.id + extension)):
            return read_video(os.path.join(folder, clip.id + extension), size)
    raise ArgumentError(
        "generated", f"{folder} has no {clip.id}.npy or {clip.id}.mp4 (or another video) for clip {clip.id}"
    )


def measure_clip(generated: np.ndarray, truth: np.ndarray, waveform: np.ndarray, folder: Optional[str], clip_id: str):
    """One clip's row: its own measures on the generated clip (gen_) and on the ground truth (gt_), and the
    generated clip against the ground truth; with `folder`, its per-frame figures go to `folder/ID.csv`."""
    from . import measures

    count = min(len(generated), len(truth))
    generated, truth = generated[:count], truth[:count]
    waveform = waveform[: count * SAMPLES_PER_FRAME]
    gen_points, gt_points = measures.clip_landmarks(generated), measures.clip_landmarks(truth)
    row = {"clip": clip_id, "frames": count}
    row.update({f"gen_{k}": v for k, v in measures.clip_measures(generated, gen_points, waveform).items()})
    row.update({f"gt_{k}": v for k, v in measures.clip_measures(truth, gt_points, waveform).items()})
    row.update({f"gen_{k}": v for k, v in measures.compared_measures(generated, gen_points, truth, gt_points).items()})
    if folder:
        os.makedirs(folder, exist_ok=True)
        per_frame = {
            "frame": np.arange(count),
            "loudness_db": measures.loudness(waveform, count),
            "gen_mouth_opening": measures.mouth_opening(gen_points),
            "gt_mouth_opening": measures.mouth_opening(gt_points),
            "gen_eye_ratio": measures.eye_aspect_ratio(gen_points),
            "gt_eye_ratio": measures.eye_aspect_ratio(gt_points),
            "psnr_db": [measures.psnr(generated[i : i + 1], truth[i : i + 1]) for i in range(count)],
        }
        path = os.path.join(folder, clip_id + ".csv")
        with open(path + ".partial", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(per_frame)
            writer.writerows(zip(*per_frame.values()))
        os.replace(path + ".partial", path)
    return row


def summarise(rows: List[dict]) -> dict:
    """Mean and 95% interval half-width of every measure over the clips."""
    keys = [k for k in rows[0] if k not in ("clip", "frames")]
    return {k: mean_and_interval([r[k] for r in rows]) for k in keys}


def write_results(folder: str, rows: List[dict], summary: dict, info: dict) -> None:
    with open(os.path.join(folder, "clips.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(folder, "summary.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["measure", "generated", "generated_ci95", "ground_truth", "ground_truth_ci95"])
        for name, (mean, interval), truth in _summary_lines(summary):
            writer.writerow([name, mean, interval, *(truth or ("", ""))])
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {**info, "clips": len(rows), "frames": sum(r["frames"] for r in rows), "measures": summary}, f, indent=1
        )


def _summary_lines(summary: dict):
    """(measure, generated (mean, ci), ground truth (mean, ci) or None) for every measure of a summary."""
    for key, value in summary.items():
        if key.startswith("gen_"):
            name = key[len("gen_") :]
            yield name, value, summary.get("gt_" + name)


def _figure(value) -> str:
    mean, interval = value
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.3f}" + (f" ± {interval:.3f}" if np.isfinite(interval) else "")


def print_summary(summary: dict, clips: int, frames: int) -> None:
    print(f"\n{clips} clips, {frames} frames (mean ± 95% interval over the clips)")
    print(f"  {'measure':<22} {'generated':>18} {'ground truth':>18}")
    for name, value, truth in _summary_lines(summary):
        print(f"  {name:<22} {_figure(value):>18} {_figure(truth) if truth else '':>18}")
    found = summary.get("gen_face_found", (1.0, 0.0))[0]
    if found < 0.9:
        print(
            f"note: the face mesh found a face in {100 * found:.0f}% of the generated frames; the landmark measures "
            "(sync, blinks, head jitter, LMD) cover only those"
        )


def measure_all(data, clips, generated_folder, size, output_dir, state, bar=None) -> List[dict]:
    """Measure every clip (this process's share; rows already written are kept) and return all rows, read back
    from `output_dir/clips/ID.json` once every process is done."""
    folder = os.path.join(output_dir, CLIPS_FOLDER)
    os.makedirs(folder, exist_ok=True)
    pending = [c for c in clips if not os.path.isfile(os.path.join(folder, c.id + ".json"))]
    with state.split_between_processes(pending) as mine:
        for clip in mine:
            truth = resize_frames(data.frames(clip), size)
            row = measure_clip(read_generated(generated_folder, clip, size), truth, data.audio(clip), folder, clip.id)
            with open(os.path.join(folder, clip.id + ".json.partial"), "w", encoding="utf-8") as f:
                json.dump(row, f)
            os.replace(os.path.join(folder, clip.id + ".json.partial"), os.path.join(folder, clip.id + ".json"))
            if bar is not None:
                bar.update()
    state.wait_for_everyone()
    rows = []
    for clip in clips:
        with open(os.path.join(folder, clip.id + ".json"), encoding="utf-8") as f:
            rows.append(json.load(f))
    return rows


@dataclass
class PreparedEvaluation:
    """How the clips of a prepared dataset are regenerated and where they come from, for the results' record."""

    data: str  # the prepared dataset's folder
    split: str = "test"
    model: Optional[str] = None  # the model's folder or Hub id, as recorded (None: the built-in model)
    generated: Optional[str] = None  # a folder of clips made elsewhere, measured instead of regenerating
    seed: int = 0
    stabilize_every: Optional[int] = None


def evaluate_prepared(
    settings: PreparedEvaluation, pipe, data, clips, output_dir, steps, scheduler_name=None, log=print
):
    """Regenerate (unless `settings.generated` names clips made elsewhere) and measure the clips of a prepared
    dataset into `output_dir`; returns the rows, the summary and the seconds of generating per frame (None when
    nothing was generated here)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=pipe is None or pipe.device.type == "cpu")
    size = pipe.unet.config.sample_size if pipe is not None else data.size
    generated = settings.generated
    if generated is None:
        generated = os.path.join(output_dir, GENERATED)
        bar = tqdm(total=len(clips), desc="generating", unit="clip", disable=not state.is_main_process)
        generate_clips(pipe, data, clips, generated, steps, settings.seed, settings.stabilize_every, state, bar)
        bar.close()
        state.wait_for_everyone()
    bar = tqdm(total=len(clips), desc="measuring", unit="clip", disable=not state.is_main_process)
    rows = measure_all(data, clips, generated, size, output_dir, state, bar)
    bar.close()
    seconds = None
    if settings.generated is None:
        timings = []
        for clip in clips:
            with open(os.path.join(generated, clip.id + ".json"), encoding="utf-8") as f:
                timings.append(json.load(f))
        seconds = sum(t["seconds"] for t in timings) / max(1, sum(t["frames"] for t in timings))
    summary = summarise(rows)
    if state.is_main_process:
        info = {"data": os.path.abspath(settings.data), "split": settings.split, "size": size, "steps": steps}
        info.update(model=settings.model or "built-in", scheduler=scheduler_name, generated=settings.generated)
        info["seconds_per_frame"] = seconds
        write_results(output_dir, rows, summary, info)
    return rows, summary, seconds


def compare(first: str, second: str) -> int:
    """Two result folders side by side: every measure of each, and the difference."""
    summaries = []
    for folder in (first, second):
        path = os.path.join(folder, "summary.json")
        try:
            with open(path, encoding="utf-8") as f:
                summaries.append(json.load(f))
        except (OSError, ValueError) as error:
            raise ArgumentError("compare", f"{folder} holds no readable summary.json ({error})") from None
    a, b = (s["measures"] for s in summaries)
    names = [os.path.basename(os.path.normpath(f)) or f for f in (first, second)]
    print(f"{'measure':<26} {names[0][:18]:>18} {names[1][:18]:>18} {'difference':>11}")
    for key in a:
        if key not in b:
            continue
        difference = b[key][0] - a[key][0]
        print(f"{key:<26} {_figure(a[key]):>18} {_figure(b[key]):>18} {difference:>+11.3f}")
    print(f"({summaries[0]['clips']} and {summaries[1]['clips']} clips; mean ± 95% interval over the clips)")
    return 0


def model_name(model: Optional[str]) -> str:
    """How a `--model` value is named in tables: a built-in name, or the folder's or Hub id's last part."""
    if model is None:
        return "built-in"
    return os.path.basename(os.path.normpath(model)) or model


def drawn_summary_text(name: str, pipe, steps: int, summary: dict) -> str:
    """The summary of one model on drawn clips: mean ± 95% interval over the clips."""
    from .hub.pipeline_diffused_heads import scheduler_uses_variance

    config = pipe.scheduler.config
    sampler = f"{type(pipe.scheduler).__name__} (timestep_spacing {config.timestep_spacing}"
    uses_variance = scheduler_uses_variance(pipe.scheduler) or "DDPM" in sampler
    sampler += f", variance_type {config.variance_type})" if uses_variance else ")"

    def figure(key, digits):
        interval = summary[key + "_ci95"]
        return f"{summary[key]:.{digits}f}" + (f" ± {interval:.{digits}f}" if np.isfinite(interval) else "")

    return (
        f"\n{name}: {summary['clips']} clips, {summary['frames']} frames, {sampler} {steps} steps "
        "(mean ± 95% interval over the clips):\n"
        f"  mouth vs speech envelope  r = {figure('r_gen_env', 3)} (ground truth {figure('r_gt_env', 3)})\n"
        f"  generated vs ground-truth mouth  r = {figure('r_gen_gt', 3)}\n"
        f"  identity kept outside the mouth: PSNR {figure('psnr_id_gen', 2)} dB "
        f"(ground truth {figure('psnr_id_gt', 2)} dB)"
    )
