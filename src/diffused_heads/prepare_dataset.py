"""Turn a folder of ordinary talking-head videos into a training set (a prepared dataset, see `dataset`).

    diffused-heads prepare-dataset raw_videos/ data/
    accelerate launch --num_processes 8 -m diffused_heads prepare-dataset raw_videos/ data/

Every video under RAW (any container, codec, frame rate, size, sample rate and channel count) is resampled to
25 fps with 16 kHz mono speech, exactly 640 samples per frame. One face is followed through it (the largest
where it starts, then the box that overlaps it most); the clip is split at scene cuts and where the face is
missing for more than `--max-gap` frames. Each frame is aligned on the identity template (the one
`prepare-face` uses, or `--reference`) by the similarity transform of its five stable face-mesh points,
smoothed over time (a local quadratic fit over `--smoothing` frames on each side, in the source's own time) so
that the head does not jitter, and the person is put on the training green (`--keep-background` keeps the
video's background). The mouth box of each frame (the face mesh's outer lips, for the lip loss) is stored with
it. The manifest gives, per clip, how far the landmarks move from frame to frame in the video (in pixels of the
output) and in the aligned frames (found again there).

Parts that cannot be used are left out with a reason in the manifest: unreadable, no audio, silent, no face,
too short, several faces of similar size (who speaks is unclear). Speakers (`--speaker-from`) are split into
train and test with a fixed seed. A run resumes where it stopped: every finished video leaves a record, and
the manifest is written from all records at the end.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .cli_utils import HelpFormatter, ProgressBoard, add_face_options, parse_colour, run_command
from .errors import ArgumentError, MediaError
from .video_preparation import PreparationSettings, VideoPreparer

logger = logging.getLogger(__name__)

RECORDS = "records"
OPTIONS_FILE = "preparation.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="diffused-heads prepare-dataset",
        description="Make a training set from a folder of talking-head videos (see the module docs); runs under "
        "accelerate launch.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("raw", metavar="RAW", help="folder of videos (searched recursively)")
    p.add_argument("output", metavar="OUT", help="the prepared dataset's folder (created; a run resumes in it)")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels (the released model: 128)")
    add_face_options(p, "the speaker")
    p.add_argument(
        "--aligned",
        action="store_true",
        help="RAW holds ready, aligned square clips (NAME.mp4 [+ NAME.wav] [+ NAME.json mouth boxes], what "
        "make-dataset writes): only resize and store them",
    )
    p.add_argument(
        "--speaker-from",
        choices=("folder", "prefix", "clip"),
        default="folder",
        help="who speaks in a video: its folder under RAW (a video at the top is its own speaker), the part of "
        "its name before the first '_' (CREMA-D, MEAD), or each video its own",
    )
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of the speakers in the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--max-gap", type=int, default=5, help="frames a face may be missing before the clip is split")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter parts are left out")
    p.add_argument(
        "--smoothing",
        type=int,
        default=3,
        help="frames on each side of the local quadratic fit that smooths the alignment over time (0: none)",
    )
    args = p.parse_args(argv)
    if args.size < 16:
        p.error("--size must be at least 16")
    if not 0.0 <= args.test_fraction < 1.0:
        p.error("--test-fraction must be in [0, 1)")
    if args.max_gap < 0 or args.min_seconds <= 0 or args.smoothing < 0:
        p.error("--max-gap and --smoothing must be 0 or more, --min-seconds above 0")
    from .faces import FRAMING

    try:
        args.scale = FRAMING[args.scale] if args.scale in FRAMING else float(args.scale)
    except ValueError:
        args.scale = -1.0
    if not args.scale > 0:
        p.error(f"--scale takes a positive number or one of {', '.join(FRAMING)}")
    return args


# --------------------------------------------------------------------------------------------------
# Sources


def find_videos(raw: str) -> List[str]:
    """The videos under `raw`, as paths relative to it, sorted."""
    from .media import VIDEO_EXTENSIONS

    if not os.path.isdir(raw):
        raise ArgumentError("raw", f"{raw}: no such folder")
    found = []
    for folder, subfolders, names in os.walk(raw):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in names:
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), raw))
    if not found:
        raise ArgumentError("raw", f"{raw}: no videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) in it or below it")
    return sorted(found)


def _record_path(output: str, relative: str) -> str:
    key = hashlib.sha1(relative.encode("utf-8")).hexdigest()[:16]
    return os.path.join(output, RECORDS, key + ".json")


# --------------------------------------------------------------------------------------------------
# The run


def _options(args) -> dict:
    return {
        name: getattr(args, name)
        for name in (
            "size",
            "reference",
            "model",
            "scale",
            "background",
            "keep_background",
            "segmenter",
            "everyone",
            "aligned",
            "max_gap",
            "min_seconds",
            "smoothing",
            "speaker_from",
        )
    }


def _check_options(args) -> None:
    """A resumed run must use the options the folder was started with."""
    path = os.path.join(args.output, OPTIONS_FILE)
    options = _options(args)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        before.setdefault("speaker_from", "folder")  # folders begun before it was recorded: the default then
        changed = sorted(k for k in options if before.get(k) != options[k])
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise ArgumentError(
                "output",
                f"{args.output} was prepared with other options ({flags}); use a new folder, or the same options to "
                "resume",
            )
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(options, f, indent=1)
    os.replace(path + ".tmp", path)


def _read_record(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_record(path: str, record: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def run(args) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from . import dataset

    if args.aligned:
        clips, dropped = dataset.convert_clip_folder(args.raw, args.output, args.size, args.test_fraction, args.seed)
        print(f"{len(clips)} clips written to {args.output}; {len(dropped)} left out")
        return 0 if clips else 1

    from .faces import default_template, resolve_template

    state = PartialState(cpu=True)
    relatives = find_videos(args.raw)
    template = resolve_template(args.model, args.reference) or default_template()
    if state.is_main_process:
        os.makedirs(os.path.join(args.output, RECORDS), exist_ok=True)
        os.makedirs(os.path.join(args.output, dataset.CLIPS), exist_ok=True)
        _check_options(args)
    state.wait_for_everyone()
    pending = [r for r in relatives if _read_record(_record_path(args.output, r)) is None]
    if state.is_main_process and len(pending) < len(relatives):
        logger.info(f"{len(relatives) - len(pending)} of {len(relatives)} videos were prepared before: skipped")
    board = ProgressBoard(args.output, state.process_index, state.num_processes)
    bar = None
    if state.is_main_process:
        bar = tqdm(total=len(pending), unit="video", desc="prepare-dataset", dynamic_ncols=True)
    settings = PreparationSettings(
        output=args.output,
        size=args.size,
        scale=args.scale,
        min_seconds=args.min_seconds,
        max_gap=args.max_gap,
        smoothing=args.smoothing,
        background=parse_colour(args.background),
        keep_background=args.keep_background,
        everyone=args.everyone,
        segmenter=args.segmenter,
        speaker_from=args.speaker_from,
    )
    prepare = VideoPreparer(settings, template)
    done, frames = 0, 0
    started = time.perf_counter()
    with state.split_between_processes(pending) as mine:
        for relative in mine:
            clips, dropped = prepare(args.raw, relative)
            _write_record(
                _record_path(args.output, relative), {"source": relative, "clips": clips, "dropped": dropped}
            )
            done += 1
            frames += sum(c["frames"] for c in clips)
            board.post(done, frames, every=0.5)
            if bar is not None:
                bar.n = board.read()["jobs"]
                bar.refresh()
    board.post(done, frames, finished=True)
    if bar is not None:  # follow the other processes until all are finished
        board.follow(bar, "jobs")
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    board.remove()
    clips, dropped = [], []
    for relative in relatives:
        record = _read_record(_record_path(args.output, relative)) or {"clips": [], "dropped": []}
        clips += record["clips"]
        dropped += record["dropped"]
    dataset.assign_splits(clips, args.test_fraction, args.seed)
    jitter = {
        "jitter_in_px": round(float(np.mean([c["jitter_in_px"] for c in clips])), 3) if clips else None,
        "jitter_out_px": round(float(np.mean([c["jitter_out_px"] for c in clips])), 3) if clips else None,
    }
    manifest = dataset.write_manifest(
        args.output, args.size, clips, dropped, template=template.source, alignment=jitter, options=_options(args)
    )
    print_summary(manifest, time.perf_counter() - started)
    if not clips:
        raise MediaError(f"no usable clips in {args.raw}: {len(dropped)} part(s) left out ({_reasons(dropped)})")
    return 0


def _reasons(dropped: List[dict]) -> str:
    from .dataset import count_reasons

    return ", ".join(f"{k}: {v}" for k, v in count_reasons(dropped).items())


def print_summary(manifest: dict, seconds: float) -> None:
    summary = manifest["summary"]
    print(
        f"{summary['clips']} clips ({summary['minutes']:.1f} min, {summary['speakers']} speakers; "
        f"train {summary['train_clips']}, test {summary['test_clips']}) in {seconds:.0f} s"
    )
    alignment = manifest.get("alignment") or {}
    if alignment.get("jitter_in_px") is not None:
        print(
            f"landmark motion per frame: {alignment['jitter_in_px']:.2f} px in the videos, "
            f"{alignment['jitter_out_px']:.2f} px in the aligned frames"
        )
    if manifest["dropped"]:
        print(f"left out: {len(manifest['dropped'])} ({_reasons(manifest['dropped'])}); see the manifest")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(
        lambda: run(args),
        flags={"raw": "RAW", "output": "OUT"},
        interrupted="finished videos are kept; run again to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
