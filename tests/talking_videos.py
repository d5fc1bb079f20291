"""Talking-head videos made at test time from real photos that ship in installed packages (scikit-image's
astronaut, matplotlib's Grace Hopper): the head moves, turns and changes size over time on a busy background,
with speech-like sound; a second face or a scene change can be cut in."""

import os
from fractions import Fraction
from typing import Optional

import numpy as np
import PIL.Image
import PIL.ImageDraw

from helpers import speech_like


def hopper() -> PIL.Image.Image:
    import matplotlib

    return PIL.Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")


def astronaut() -> PIL.Image.Image:
    from skimage import data

    return PIL.Image.fromarray(data.astronaut())


# The head and shoulders of each photo (left, top, right, bottom), in its pixels.
HEADS = {"astronaut": (90, 0, 330, 260), "hopper": (60, 20, 460, 500)}
PHOTOS = {"astronaut": astronaut, "hopper": hopper}


def head(name: str, width: int) -> PIL.Image.Image:
    crop = PHOTOS[name]().crop(HEADS[name])
    return crop.resize((width, round(width * crop.height / crop.width)), PIL.Image.LANCZOS)


def busy_background(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Bricks, printed words and coloured logos: a background no segmenter mistakes for plain."""
    rng = np.random.default_rng(seed)
    image = PIL.Image.new("RGB", (width, height), (150, 70, 50))
    draw = PIL.ImageDraw.Draw(image)
    for row, y in enumerate(range(0, height, 18)):
        for x in range(-40 if row % 2 else -20, width, 40):
            shade = tuple(int(c) for c in rng.integers(110, 190, 3) * np.array([1.0, 0.5, 0.4]))
            draw.rectangle((x + 2, y + 2, x + 38, y + 16), fill=shade)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 20))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x, y, x + 30, y + 30), fill=colour)
        draw.text((x + 5, y + 32), "LOGO 2026", fill=(255, 255, 255))
    return image


def motion(t: float, amount: float = 1.0):
    """(angle in degrees, scale, shift x, shift y) of the head at time `t` seconds."""
    return (
        amount * 8.0 * np.sin(2 * np.pi * t / 1.7),
        1.0 + amount * 0.12 * np.sin(2 * np.pi * t / 2.3),
        amount * 18.0 * np.sin(2 * np.pi * t / 1.3),
        amount * 10.0 * np.cos(2 * np.pi * t / 1.9),
    )


def frame_at(
    t: float,
    face: str,
    size=(320, 240),
    background: Optional[PIL.Image.Image] = None,
    amount: float = 1.0,
    head_width: int = 150,
    second: Optional[str] = None,
) -> np.ndarray:
    width, height = size
    canvas = (background or busy_background(width, height)).copy()
    angle, scale, dx, dy = motion(t, amount)
    centre_x, centre_y = width / 2 + dx, height / 2 + dy
    if second is not None:  # another person beside the speaker, as large
        other = head(second, head_width).convert("RGBA")
        canvas.paste(other, (width - other.width + 30, height - other.height), other)
        centre_x -= width // 5
    # The head is placed by one exact affine map (no rounding), so its motion is smooth to the sub-pixel.
    picture = head(face, 2 * head_width).convert("RGBA")
    zoom = scale * head_width / picture.width
    turn = np.deg2rad(angle)
    forward = np.array(
        [
            [zoom * np.cos(turn), zoom * np.sin(turn), 0.0],
            [-zoom * np.sin(turn), zoom * np.cos(turn), 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    forward[:2, 2] = np.array([centre_x, centre_y]) - forward[:2, :2] @ np.array([picture.width, picture.height]) / 2
    inverse = np.linalg.inv(forward)[:2].ravel().tolist()
    placed = picture.transform((width, height), PIL.Image.AFFINE, inverse, PIL.Image.BILINEAR)
    canvas.paste(placed, (0, 0), placed)
    return np.asarray(canvas)


def write_video(path: str, frames, fps=30, audio: Optional[np.ndarray] = None, audio_rate=44100, channels=2):
    """An H.264 video with AAC sound (`audio` at 16 kHz, written at `audio_rate` with `channels` channels)."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=audio_rate)
            sound.layout = "stereo" if channels == 2 else "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            import torch

            from diffused_heads.media import resample_audio

            samples = resample_audio(torch.from_numpy(audio), 16000, audio_rate).numpy().astype(np.float32)
            planar = np.repeat(samples[None], channels, axis=0)
            step = 1024
            for start in range(0, planar.shape[1], step):
                chunk = np.ascontiguousarray(planar[:, start : start + step])
                piece = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=sound.layout.name)
                piece.sample_rate = audio_rate
                piece.pts = start
                for packet in sound.encode(piece):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path


def talking_video(
    path: str,
    face: str = "astronaut",
    seconds: float = 2.0,
    fps: float = 30,
    size=(320, 240),
    amount: float = 1.0,
    seed: int = 0,
    second: Optional[str] = None,
    cut_to: Optional[str] = None,
    cut_at: float = 0.5,
    silent: bool = False,
    audio_rate: int = 44100,
    channels: int = 2,
    noise: float = 0.0,
):
    """A video of `face` talking; `second` puts another face of the same size beside it; `cut_to` changes the
    scene at `cut_at` (a share of the length) to that face on another background; `noise` adds camera noise of
    that standard deviation to every frame."""
    background = busy_background(*size, seed=seed)
    other_background = busy_background(*size, seed=seed + 100)
    count = int(round(seconds * fps))
    frames = []
    for index in range(count):
        t = index / fps
        if cut_to is not None and index >= cut_at * count:
            frames.append(frame_at(t, cut_to, size, other_background, amount, head_width=110))
        else:
            frames.append(frame_at(t, face, size, background, amount, second=second))
    if noise:
        rng = np.random.default_rng(seed)
        frames = [(f + rng.normal(0, noise, f.shape)).clip(0, 255).astype(np.uint8) for f in frames]
    audio = np.zeros(int(seconds * 16000), np.float32) if silent else speech_like(seconds, seed=seed)
    return write_video(path, frames, fps, audio, audio_rate, channels)


# --------------------------------------------------------------------------------------------------
# Aligned clips whose mouth and eyes move on command (the known answers of the measures)


def _displace(image: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """`image` (H, W, 3) float with each pixel taken from `dy` pixels above it (bilinear)."""
    height, width = image.shape[:2]
    rows = np.clip(np.arange(height)[:, None] - dy, 0, height - 1.001)
    top = np.floor(rows).astype(int)
    share = (rows - top)[..., None]
    columns = np.arange(width)[None].repeat(height, 0)
    return image[top, columns] * (1 - share) + image[top + 1, columns] * share


def _bump(size: int, centre, radius_x: float, radius_y: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return np.exp(-(((x - centre[0]) / radius_x) ** 2 + ((y - centre[1]) / radius_y) ** 2))


def talking_photo(opening, eyes_shut=None, size: int = 128, face: str = "astronaut", motion_amount: float = 0.3):
    """Frames `(F, size, size, 3)` uint8 of an aligned real photo whose lips part by `opening[t]` (0 to 1) and
    whose eyelids close by `eyes_shut[t]` (0 to 1), the head moving a little: the mouth and eyes are warped
    (vertical displacement fields around them, placed from the photo's own face mesh)."""
    from diffused_heads.faces import FaceModels, face_mesh, prepare_identity

    base = np.asarray(prepare_identity(PHOTOS[face](), size=size), np.float64)
    points = face_mesh(FaceModels.shared(), base.astype(np.uint8), (0, 0, size, size))
    mouth = points[[13, 14]].mean(axis=0)
    width = np.linalg.norm(points[61] - points[291])
    eyes = [points[[159, 145]].mean(axis=0), points[[386, 374]].mean(axis=0)]
    eye_width = np.linalg.norm(points[33] - points[133])
    y = np.arange(size, dtype=np.float64)[:, None]
    frames = []
    eyes_shut = np.zeros(len(opening)) if eyes_shut is None else eyes_shut
    for t, (amount, shut) in enumerate(zip(opening, eyes_shut)):
        # Lips apart: above the mouth line pixels move up, below it down, by up to 0.12 of the mouth's width.
        lips = _bump(size, mouth, 0.7 * width, 0.45 * width) * amount * 0.12 * width
        dy = np.where(y < mouth[1], -lips, lips)
        # Eyelids together: pixels around each eye move towards its middle line.
        for eye in eyes:
            lids = _bump(size, eye, 0.8 * eye_width, 0.5 * eye_width) * shut * 0.2 * eye_width
            dy += np.where(y < eye[1], lids, -lids)
        frame = _displace(base, dy)
        angle, scale, dx, dy_head = motion(t / 25.0, motion_amount)
        picture = PIL.Image.fromarray(frame.clip(0, 255).astype(np.uint8))
        picture = picture.rotate(angle, PIL.Image.BILINEAR, translate=(dx / 4, dy_head / 4), fillcolor=(0, 177, 64))
        frames.append(np.asarray(picture))
    return np.stack(frames)


def speech_with_envelope(envelope, seed: int = 0) -> np.ndarray:
    """16 kHz speech-like sound whose loudness in each 40 ms frame follows `envelope` (0 to 1)."""
    frames = len(envelope)
    carrier = speech_like(frames * 0.04, seed=seed)
    carrier /= np.abs(carrier).max()
    gain = np.repeat(0.02 + 0.5 * np.asarray(envelope, np.float64), 640)
    return (carrier[: len(gain)] * gain).astype(np.float32)
