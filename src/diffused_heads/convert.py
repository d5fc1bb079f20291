"""`diffused-heads convert`: the repository's converter (`convert_checkpoint.py`), plus `--reference-video`, which
measures the face framing and background of a real training clip with the faces extra and stores it with the
model.

    diffused-heads convert --unet crema_script.pt --audio-encoder audio_encoder.pt --output-dir crema
"""

import sys

from .cli_utils import run_command
from .errors import ArgumentError


def parse_args(argv=None):
    from .hub.convert_checkpoint import build_parser

    parser = build_parser(prog="diffused-heads convert")
    parser.add_argument(
        "--reference-video",
        metavar="CLIP",
        help="a preprocessed clip of the training data: its face framing and background colour are stored with the "
        "model, and face preparation for it uses them (needs the faces extra)",
    )
    return parser.parse_args(argv)


def run(args) -> int:
    from .hub import convert_checkpoint

    template = None
    if args.reference_video is not None:
        from .faces import template_from_reference
        from .media import MediaError

        try:
            template = template_from_reference(args.reference_video)
        except MediaError as error:
            raise ArgumentError("reference_video", f": {error}") from None
        print(f"Identity template measured on {args.reference_video}: background {template.background}")
    convert_checkpoint.run(args, identity_template=template)
    return 0


def main(argv=None) -> int:
    from .hub.convert_checkpoint import FLAGS

    args = parse_args(argv)
    return run_command(lambda: run(args), flags=FLAGS)


if __name__ == "__main__":
    sys.exit(main())
