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
