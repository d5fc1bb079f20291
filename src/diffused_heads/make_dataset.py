"""`diffused-heads make-dataset`: synthetic talking-face clips (video + 16 kHz speech + mouth boxes) for training
and evaluation, or the example inputs of the built-in model.

    diffused-heads make-dataset --output data/train --num-clips 600 --split train --size 64
"""

import argparse
import json
import os
import sys

from .cli_utils import HelpFormatter, run_command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads make-dataset",
        description="Make synthetic talking-face clips (video + 16 kHz speech + mouth boxes).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output", required=True, help="folder to write the clips to (created)")
    parser.add_argument("--examples", action="store_true", help="write the example image and speech instead")
    parser.add_argument("--num-clips", type=int, default=400, help="number of clips")
    parser.add_argument(
        "--split", choices=("train", "eval"), default="train", help="eval: other identities and voices"
    )
    parser.add_argument("--size", type=int, default=64, help="frame size in pixels (even)")
    parser.add_argument("--max-seconds", type=float, default=3.2, help="longest clip, in seconds")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--speech",
        choices=("auto", "espeak", "synthetic"),
        default="auto",
        help="auto: espeak-ng where installed, synthetic syllables otherwise",
    )
    return parser.parse_args(argv)


def run(args) -> int:
    import numpy as np
    import soundfile
    from tqdm.auto import tqdm

    from .media import SAMPLING_RATE, export_to_video_with_audio
    from .synthetic_data import EVAL_VOICES, TRAIN_VOICES, espeak_available, make_clip, make_examples

    if args.examples:
        make_examples(args.output)
        print(f"wrote the example identity image and speech to {args.output}")
        return 0
    if args.num_clips < 1 or args.size < 16 or args.size % 2 or args.max_seconds < 1.0:
        raise ValueError("--num-clips must be >= 1, --size even and >= 16, --max-seconds >= 1")
    use_espeak = args.speech == "espeak" or (args.speech == "auto" and espeak_available())
    if args.speech == "espeak" and not espeak_available():
        raise ValueError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    if not use_espeak and args.speech == "auto":
        print("espeak-ng not found: using synthetic syllable-like sounds")
    voices = TRAIN_VOICES if args.split == "train" else EVAL_VOICES
    # Separate seed ranges keep eval identities and sentences apart from the training ones.
    base_seed = args.seed * 1_000_003 + (0 if args.split == "train" else 500_000)
    os.makedirs(args.output, exist_ok=True)
    for index in tqdm(range(args.num_clips), desc=f"{args.split} clips"):
        rng = np.random.default_rng(base_seed + index)
        frames, waveform, info = make_clip(rng, args.size, voices, use_espeak, args.max_seconds)
        name = os.path.join(args.output, f"{args.split}_{index:05d}")
        soundfile.write(name + ".wav", waveform, SAMPLING_RATE, subtype="FLOAT")
        with open(name + ".json", "w", encoding="utf-8") as f:
            json.dump(info, f)
        export_to_video_with_audio(frames, waveform, name + ".mp4", size=None, overwrite=True)
    print(f"wrote {args.num_clips} clips to {args.output}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
