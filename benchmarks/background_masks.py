"""How well the background becomes the training green on busy photos, per segmenter choice, in one run.

    python benchmarks/background_masks.py
    python benchmarks/background_masks.py --picture docs/busy-background.png

The photos are the composites of `tests/composites.py`: real portraits (scikit-image's astronaut, matplotlib's
Grace Hopper) pasted by a hand-traced outline onto bricks, a printed page, logos and a crowd of other pictures,
alone and beside other people, so the person's mask is known exactly. For each choice, and each scene, it
prints the share of the true background set to background and the share of the true person kept (mask at 0.5;
a 2-pixel band around the true outline and what the photo does not cover are left out), on the 128x128 frame.
"""

import argparse
import os
import sys

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from diffused_heads import faces  # noqa: E402

from composites import SCENES, measure, scene  # noqa: E402

CHOICES = [
    ("general, frame only, everyone (before)", dict(everyone=True), 1.0),
    ("general, frame only, one person", dict(), 1.0),
    ("general, 1.5x context, everyone", dict(everyone=True), 1.5),
    ("general, 1.5x context, one person (default)", dict(), 1.5),
    ("landscape, 1.5x context, one person", dict(segmenter="landscape"), 1.5),
    ("pose, 1.5x context, one person", dict(segmenter="pose"), 1.5),
]


def picture(path: str) -> None:
    rows = []
    for kind in ("pair", "crowd", "close"):
        photo, _ = scene(kind)
        faces.SEGMENTATION_CONTEXT = 1.0
        before = faces.prepare_identity(photo, everyone=True, size=256)
        faces.SEGMENTATION_CONTEXT = 1.5
        after = faces.prepare_identity(photo, size=256)
        shown = photo.resize((round(photo.width * 256 / photo.height), 256), PIL.Image.LANCZOS)
        rows.append(np.concatenate([np.asarray(shown), np.asarray(before), np.asarray(after)], axis=1))
    PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    print(f"Wrote {path}: photo, before (the segmenter on the frame, everyone), after (default)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picture", help="also write a before/after picture here")
    args = parser.parse_args()
    print(f"{'choice':<46}" + "".join(f"{kind:>12}" for kind in SCENES) + f"{'worst':>12}")
    for label, options, context in CHOICES:
        faces.SEGMENTATION_CONTEXT = context
        rows = measure(**options)
        cells = [f"{r['background_green'] * 100:5.1f}/{r['person_kept'] * 100:5.1f}" for r in rows]
        worst = (
            f"{min(r['background_green'] for r in rows) * 100:5.1f}/{min(r['person_kept'] for r in rows) * 100:5.1f}"
        )
        print(f"{label:<46}" + "".join(f"{c:>12}" for c in cells) + f"{worst:>12}")
    faces.SEGMENTATION_CONTEXT = 1.5
    print("(each cell: % of the background green / % of the person kept)")
    if args.picture:
        picture(args.picture)


if __name__ == "__main__":
    main()
