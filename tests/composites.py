"""Photos of people on busy backgrounds with a known person mask, made at test time from real portraits that ship
in installed packages (scikit-image's astronaut, matplotlib's Grace Hopper) and backgrounds from scikit-image's
data (brick, a printed page, text, a crowd made of the other photos).

The person masks do not come from any segmenter: each portrait's outline was traced by hand as a polygon a few
pixels inside the person (hair, face, shoulders; the astronaut's held helmet left out) and eroded by 5 more
pixels; only the pixels inside it are pasted, so in a composite that polygon is exactly the person.
"""

from typing import List, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

from talking_videos import PHOTOS, busy_background

# Outlines in the photos' own pixels, and the part of each photo that is pasted (the bust).
OUTLINES = {
    "astronaut": [
        (200, 24), (232, 18), (258, 20), (276, 35), (292, 55), (297, 80), (296, 105), (289, 122), (272, 128),
        (266, 140), (265, 160), (268, 165), (280, 180), (290, 198), (296, 215), (298, 240), (293, 262), (320, 275),
        (345, 290), (356, 330), (35, 330), (45, 290), (70, 265), (118, 245), (113, 205), (122, 180), (150, 162),
        (172, 153), (188, 150), (186, 140), (175, 128), (165, 115), (160, 85), (166, 55), (182, 35),
    ],
    "hopper": [
        (215, 30), (260, 22), (305, 30), (335, 55), (355, 80), (368, 110), (365, 140), (358, 175), (352, 220),
        (345, 260), (330, 300), (350, 330), (400, 350), (460, 375), (495, 410), (505, 450), (505, 560), (25, 560),
        (25, 470), (35, 420), (60, 390), (110, 360), (150, 345), (195, 330), (192, 300), (178, 262), (160, 210),
        (160, 160), (155, 135), (160, 100), (175, 70), (195, 45),
    ],
}  # fmt: skip
BUSTS = {"astronaut": (0, 0, 512, 330), "hopper": (0, 0, 512, 560)}


def cutout(name: str) -> Tuple[PIL.Image.Image, PIL.Image.Image]:
    """A portrait's bust and its person mask (mode "L", 255 inside)."""
    photo = PHOTOS[name]()
    mask = PIL.Image.new("L", photo.size, 0)
    PIL.ImageDraw.Draw(mask).polygon(OUTLINES[name], fill=255)
    mask = mask.filter(PIL.ImageFilter.MinFilter(11))
    box = BUSTS[name]
    return photo.crop(box), mask.crop(box)


def _data_image(name: str) -> PIL.Image.Image:
    from skimage import data

    return PIL.Image.fromarray(getattr(data, name)()).convert("RGB")


def background(kind: str, width: int, height: int) -> PIL.Image.Image:
    if kind == "logos":
        return busy_background(width, height, seed=3)
    if kind == "brick":
        tile = _data_image("brick")
        tinted = PIL.Image.merge(
            "RGB", [p.point(lambda v, f=f: int(v * f)) for p, f in zip(tile.split(), (1.0, 0.55, 0.45))]
        )
        return tinted.resize((width, height))
    if kind == "text":
        page = _data_image("page").resize((width // 2, height // 2))
        canvas = PIL.Image.new("RGB", (width, height))
        for x in (0, width // 2):
            for y in (0, height // 2):
                canvas.paste(page, (x, y))
        return canvas
    if kind == "crowd":  # other pictures, people and a cat, as a wall behind
        canvas = _data_image("coffee").resize((width, height))
        for k, (picture, scale) in enumerate(
            [(PHOTOS["hopper"](), 0.3), (_data_image("chelsea"), 0.45), (PHOTOS["astronaut"](), 0.3)] * 2
        ):
            small = picture.resize((int(picture.width * scale), int(picture.height * scale)))
            canvas.paste(small, (k * width // 6 - 20, (k % 2) * height // 3))
        return canvas
    raise ValueError(kind)


def paste(canvas: PIL.Image.Image, truth: PIL.Image.Image, name: str, height: int, left: int, bottom: int) -> None:
    """Paste a bust `height` pixels high with its bottom-left at (`left`, `bottom`), on the canvas and on the
    mask `truth` (255 where this person is now, 0 where it covers someone)."""
    bust, mask = cutout(name)
    factor = height / bust.height
    size = (round(bust.width * factor), height)
    bust, mask = bust.resize(size, PIL.Image.LANCZOS), mask.resize(size, PIL.Image.BILINEAR)
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    canvas.paste(bust, (left, bottom - height), mask)
    truth.paste(mask, (left, bottom - height), mask)


SCENES = ("logos", "brick", "text", "crowd", "pair", "close", "trio")


def scene(kind: str, width: int = 640, height: int = 480):
    """A composite photo and the known mask of the person it is about (the largest face), as a bool array."""
    backdrop = {"pair": "logos", "close": "brick", "trio": "crowd"}.get(kind, kind)
    canvas = background(backdrop, width, height)
    chosen = PIL.Image.new("L", (width, height), 0)
    other = PIL.Image.new("L", (width, height), 0)
    if kind == "pair":  # Grace Hopper behind, overlapped by the astronaut's shoulder
        paste(canvas, other, "hopper", 250, 360, height)
        paste(canvas, chosen, "astronaut", 340, 60, height)
        other.paste(0, (0, 0), chosen)
    elif kind == "close":  # cheek to cheek: Grace Hopper's face just beside, her shoulder behind
        paste(canvas, other, "hopper", 260, 260, height)
        paste(canvas, chosen, "astronaut", 370, 20, height)
        other.paste(0, (0, 0), chosen)
    elif kind == "trio":
        paste(canvas, other, "hopper", 240, -30, height)
        paste(canvas, other, "hopper", 240, 460, height)
        paste(canvas, chosen, "astronaut", 340, 130, height)
        other.paste(0, (0, 0), chosen)
    else:
        paste(canvas, chosen, "astronaut", 360, 110, height)
    return canvas, np.asarray(chosen) > 127


def scores(mask: np.ndarray, truth: np.ndarray, covered: np.ndarray, band: int = 2) -> Tuple[float, float]:
    """(share of the true background set to background, share of the true person kept) of a mask in [0, 1],
    leaving out a band of `band` pixels on both sides of the true outline and what the photo does not cover."""
    image = PIL.Image.fromarray(truth.astype(np.uint8) * 255)
    inner = np.asarray(image.filter(PIL.ImageFilter.MinFilter(2 * band + 1))) > 127
    outer = np.asarray(image.filter(PIL.ImageFilter.MaxFilter(2 * band + 1))) > 127
    background_pixels = ~outer & covered
    return float((mask[background_pixels] < 0.5).mean()), float((mask[inner] >= 0.5).mean())


def warped_truth(truth: np.ndarray, matrix: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The known mask, and the part the photo covers, in the aligned frame (`matrix`: photo to frame pixels)."""
    inverse = np.linalg.inv(np.vstack([matrix, (0, 0, 1)]))[:2].ravel().tolist()
    moved = PIL.Image.fromarray(truth.astype(np.uint8) * 255).transform(
        (size, size), PIL.Image.AFFINE, inverse, PIL.Image.BILINEAR
    )
    covered = PIL.Image.new("L", truth.shape[::-1], 255).transform(
        (size, size), PIL.Image.AFFINE, inverse, PIL.Image.BILINEAR
    )
    return np.asarray(moved) > 127, np.asarray(covered) > 250


def measure(kinds=SCENES, size: int = 128, **options) -> List[dict]:
    from diffused_heads.faces import align_identity

    rows = []
    for kind in kinds:
        photo, truth = scene(kind)
        aligned = align_identity(photo, size=size, **options)
        person, covered = warped_truth(truth, aligned.matrix, size)
        green, kept = scores(aligned.mask, person, covered)
        rows.append({"scene": kind, "background_green": green, "person_kept": kept})
    return rows


def moving_video(
    path: str, seconds: float = 2.0, fps: int = 25, width: int = 480, height: int = 360, plain: bool = False
) -> str:
    """A video of the astronaut (pasted by her outline) turning and moving over a busy background, Grace Hopper
    standing still beside her, with speech-like sound; `plain`: over the training green, alone (where the green
    in each frame is exactly where she is not)."""
    from helpers import speech_like
    from talking_videos import motion, write_video

    if plain:
        backdrop = PIL.Image.new("RGB", (width, height), (0, 177, 64))
    else:
        backdrop = background("logos", width, height)
        paste(backdrop, PIL.Image.new("L", (width, height)), "hopper", 150, width - 130, height)
    bust, mask = cutout("astronaut")
    picture = bust.convert("RGBA")
    picture.putalpha(mask)
    frames = []
    for index in range(int(seconds * fps)):
        angle, scale, dx, dy = motion(index / fps, 0.6)
        zoom = scale * 260 / picture.height
        turn = np.deg2rad(angle)
        forward = np.array(
            [
                [zoom * np.cos(turn), zoom * np.sin(turn), 0.0],
                [-zoom * np.sin(turn), zoom * np.cos(turn), 0.0],
                [0, 0, 1],
            ]
        )
        centre = np.array([width * 0.4 + dx, height - 130 * scale + dy])
        forward[:2, 2] = centre - forward[:2, :2] @ np.array([picture.width / 2, picture.height / 2])
        inverse = np.linalg.inv(forward)[:2].ravel().tolist()
        placed = picture.transform((width, height), PIL.Image.AFFINE, inverse, PIL.Image.BILINEAR)
        canvas = backdrop.copy()
        canvas.paste(placed, (0, 0), placed)
        frames.append(np.asarray(canvas))
    return write_video(path, frames, fps, speech_like(seconds))
