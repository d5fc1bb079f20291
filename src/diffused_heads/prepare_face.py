"""Align a face photo (or a video frame) and put it on the training green, as a model-ready identity frame.

diffused-heads prepare-face --image photo.jpg --output face.png
"""

import argparse
import os
import sys

from .cli_utils import HelpFormatter, add_face_options, parse_colour, run_command
from .errors import ArgumentError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads prepare-face",
        description="Align a face photo (or a video frame) and put it on the training green, as a model-ready "
        "identity frame.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--image", required=True, help="a photo, or a video (its --frame)")
    parser.add_argument("--output", required=True, help="the PNG file to write")
    add_face_options(parser, "the face's")
    parser.add_argument("--frame", type=int, help="with a video: the frame to use (default 0)")
    parser.add_argument("--face", default="largest", help="'largest' or the index of a face counted from the largest")
    parser.add_argument("--size", type=int, help="output size in pixels (default: the template's, 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def run(args) -> int:
    from .faces import prepare_identity, resolve_template
    from .media import save_image

    if os.path.exists(args.output) and not args.overwrite:
        raise ArgumentError("output", f"{args.output} exists; pass --overwrite to replace it")
    face = args.face if args.face == "largest" else int(args.face)
    frame = prepare_identity(
        args.image,
        template=resolve_template(args.model, args.reference),
        size=args.size,
        face=face,
        scale=args.scale,
        background=parse_colour(args.background),
        keep_background=args.keep_background,
        frame=args.frame,
        segmenter=args.segmenter,
        everyone=args.everyone,
    )
    save_image(frame, args.output)
    print(f"Wrote {args.output} ({frame.width}x{frame.height})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
