"""Make a synthetic talking-face data set: drawn faces whose mouths follow real or synthetic speech.

    diffused-heads make-dataset --output data/train --num-clips 400 --split train
    diffused-heads make-dataset --output data/eval --num-clips 40 --split eval

Every clip is a square face on the green background of the original training data, 25 fps, with 16 kHz
mono speech. Identities vary in face shape, skin, hair and eye colours, eye spacing and mouth size; the
mouth opening follows the loudness envelope of the speech, the eyes blink now and then and the head moves
a little. Speech is made with espeak-ng when it is installed (Debian: `apt-get install espeak-ng`) and as
syllable-like synthetic sounds otherwise. The `eval` split uses other identities (another seed range) and
other voices than `train`.

Each clip is written as `NAME.mp4` (H.264 + AAC, to look at), `NAME.wav` (the exact 16 kHz speech) and
`NAME.json` (per-frame mouth boxes in pixels, the mouth opening that was drawn, and how the clip was made).
"""

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import PIL.Image
import PIL.ImageDraw
import soundfile
import torch

from .hub.pipeline_diffused_heads import resample_audio
from .media import FPS, SAMPLES_PER_FRAME, SAMPLING_RATE
from .media import GREEN_BACKGROUND as GREEN

MOUTH_INSIDE = (72, 18, 30)
SUPERSAMPLE = 4

TRAIN_VOICES = [f"{lang}+{var}" for lang in ("en-us", "en-gb") for var in ("m1", "m2", "m3", "m4", "f1", "f2", "f3")]
EVAL_VOICES = [f"{lang}+{var}" for lang in ("en-gb-scotland", "en-gb-x-rp") for var in ("m6", "m7", "f4", "f5")]
WORDS = (
    "about above across after again air all almost along also always animal answer apple around away back ball "
    "bank basket beach before begin behind below best better big bird black blue boat body book bottom bread "
    "bridge bright brown build busy cake call came carry catch chair change children city clean clock close cloud "
    "cold color come corner could country cover cross dance dark daughter deep door down dream drink during early "
    "earth east easy eight evening every face fall family farm father field find fire first fish five floor "
    "flower follow food forest four friend front garden gentle glass golden good great green ground grow happy "
    "heavy help high hill home horse house hundred island jump kitchen large laugh learn letter light little live "
    "long lucky machine many market measure middle minute money moon morning mother mountain music never night "
    "north number ocean often open orange paper party people picture place plant play please pocket quick quiet "
    "rain river road rock round run seven shadow ship short silver simple sing sister small smile snow soft "
    "sound south speak spring square stone story street summer sun table tall teacher thank three today tomorrow "
    "train travel tree under until valley very voice walk warm water window winter wonder world yellow young"
).split()


# --------------------------------------------------------------------------------------------------
# Speech


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_speech(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """`text` spoken by espeak-ng, as float32 at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "speech.wav")
        subprocess.run(
            ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", path, text],
            check=True,
            capture_output=True,
        )
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = resample_audio(torch.from_numpy(samples.mean(axis=1)), rate, SAMPLING_RATE).numpy()
    return waveform.astype(np.float32)


def syllable_speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Syllable-like sounds: a voiced source with a moving formant under a random syllable envelope, with pauses."""
    n = int(seconds * SAMPLING_RATE)
    t = np.arange(n) / SAMPLING_RATE
    base = rng.uniform(90, 240)
    pitch = base * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLING_RATE
    formant = rng.uniform(500, 900) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    voice = np.zeros(n)
    for k in range(1, 40):
        voice += np.sin(k * phase) * np.exp(-(((k * pitch) - formant) ** 2) / (2 * 250.0**2)) / k**0.3
    voice += 0.05 * rng.standard_normal(n)
    envelope = np.zeros(n)
    position = rng.uniform(0.05, 0.3)
    while position < seconds - 0.15:
        length = rng.uniform(0.12, 0.3)
        start, stop = int(position * SAMPLING_RATE), min(n, int((position + length) * SAMPLING_RATE))
        envelope[start:stop] = np.sin(np.linspace(0, np.pi, stop - start)) ** 1.5 * rng.uniform(0.4, 1.0)
        position += length + (rng.uniform(0.3, 0.7) if rng.random() < 0.2 else rng.uniform(0.02, 0.12))
    signal = voice * envelope
    return (0.5 * signal / max(np.abs(signal).max(), 1e-6)).astype(np.float32)


def make_speech(rng: np.random.Generator, voices: List[str], use_espeak: bool, max_seconds: float):
    """Speech of at most `max_seconds` seconds with a short lead-in of silence, and a description of it."""
    if use_espeak:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 9))))
        voice = str(rng.choice(voices))
        pitch, speed = int(rng.integers(25, 75)), int(rng.integers(140, 190))
        waveform = espeak_speech(text, voice, pitch, speed)
        info = {"source": "espeak-ng", "text": text, "voice": voice, "pitch": pitch, "speed": speed}
    else:
        waveform = syllable_speech(rng, rng.uniform(min(2.0, 0.6 * max_seconds), max_seconds))
        info = {"source": "synthetic syllables"}
    waveform = waveform / max(np.abs(waveform).max(), 1e-6) * rng.uniform(0.3, 0.9)
    lead_in = np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLING_RATE), np.float32)
    waveform = np.concatenate([lead_in, waveform, lead_in[: len(lead_in) // 2]])
    limit = int(max_seconds * SAMPLING_RATE) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
    waveform = waveform[:limit]
    waveform = np.pad(waveform, (0, (-len(waveform)) % SAMPLES_PER_FRAME))
    return waveform.astype(np.float32), info


def speech_envelope(waveform: np.ndarray, num_frames: Optional[int] = None) -> np.ndarray:
    """Loudness per video frame in [0, 1]: RMS over 40 ms centred on each frame, in dB over a 40 dB range
    below the clip's loudest frame. This is what the drawn mouth opening follows, and what the evaluation
    correlates generated mouth openings with."""
    if num_frames is None:
        num_frames = len(waveform) // SAMPLES_PER_FRAME
    padded = np.pad(np.asarray(waveform, np.float64), (SAMPLES_PER_FRAME // 2, SAMPLES_PER_FRAME))
    rms = np.array(
        [
            np.sqrt(np.mean(padded[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME] ** 2) + 1e-12)
            for i in range(num_frames)
        ]
    )
    decibels = 20 * np.log10(rms + 1e-9)
    top = decibels.max() if len(decibels) else 0.0
    return np.clip((decibels - (top - 40.0)) / 40.0, 0.0, 1.0)


def mouth_track(envelope: np.ndarray) -> np.ndarray:
    """Mouth opening per frame from the loudness envelope: a gate (quiet frames close the mouth) and a light
    smoothing, as a real mouth cannot snap open and shut between two frames."""
    opening = np.clip((envelope - 0.35) / 0.5, 0.0, 1.0)
    kernel = np.array([0.25, 0.5, 0.25])
    return np.convolve(np.pad(opening, 1, mode="edge"), kernel, mode="valid")


# --------------------------------------------------------------------------------------------------
# Faces


@dataclass
class FaceStyle:
    face_width: float  # fractions of the image size
    face_height: float
    skin: Tuple[int, int, int]
    hair: Tuple[int, int, int]
    hair_volume: float
    eye_spacing: float
    eye_height: float
    iris: Tuple[int, int, int]
    mouth_width: float
    lips: Tuple[int, int, int]
    brow_tilt: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> "FaceStyle":
        tone = rng.uniform(0, 1)
        skin = tuple(int(v) for v in np.array([245, 205, 175]) * (1 - tone) + np.array([110, 70, 45]) * tone)
        hair = tuple(
            int(v)
            for v in rng.choice(
                [
                    [30, 20, 15],
                    [80, 50, 25],
                    [150, 100, 50],
                    [210, 180, 110],
                    [120, 120, 120],
                    [160, 60, 30],
                    [20, 20, 30],
                ]
            )
        )
        iris = tuple(int(v) for v in rng.choice([[60, 40, 20], [40, 90, 150], [70, 110, 60], [30, 30, 30]]))
        lips = tuple(int(min(255, max(0, c * rng.uniform(0.75, 0.9) + d))) for c, d in zip(skin, (30, -10, -5)))
        return cls(
            face_width=float(rng.uniform(0.46, 0.6)),
            face_height=float(rng.uniform(0.62, 0.74)),
            skin=skin,
            hair=hair,
            hair_volume=float(rng.uniform(0.0, 1.0)),
            eye_spacing=float(rng.uniform(0.16, 0.24)),
            eye_height=float(rng.uniform(-0.1, -0.04)),
            iris=iris,
            mouth_width=float(rng.uniform(0.14, 0.22)),
            lips=lips,
            brow_tilt=float(rng.uniform(-0.02, 0.02)),
        )


def draw_face(
    style: FaceStyle, opening: float, eyes_open: float, offset: Tuple[float, float], size: int
) -> Tuple[PIL.Image.Image, Tuple[int, int, int, int]]:
    """One frame: the face of `style` with the mouth `opening` (0..1) and the eyes `eyes_open` (0..1),
    moved by `offset` (fractions of the size). Returns the image and the mouth box (x0, y0, x1, y1) in pixels."""
    big = size * SUPERSAMPLE
    image = PIL.Image.new("RGB", (big, big), GREEN)
    draw = PIL.ImageDraw.Draw(image)
    cx, cy = big * (0.5 + offset[0]), big * (0.54 + offset[1])

    def box(x, y, half_w, half_h):
        return [cx + (x - half_w) * big, cy + (y - half_h) * big, cx + (x + half_w) * big, cy + (y + half_h) * big]

    fw, fh = style.face_width / 2, style.face_height / 2
    draw.rectangle(box(0, fh * 0.95, fw * 0.42, fh * 0.4), fill=tuple(int(c * 0.85) for c in style.skin))  # neck
    hair_extra = 0.02 + 0.06 * style.hair_volume
    draw.ellipse(box(0, -fh * 0.18, fw + hair_extra, fh * 0.86 + hair_extra), fill=style.hair)
    for side in (-1, 1):  # ears
        draw.ellipse(box(side * fw * 0.98, -0.01, 0.035, 0.06), fill=style.skin)
    draw.ellipse(box(0, 0, fw, fh), fill=style.skin)
    draw.chord(box(0, -fh * 0.55, fw * 1.02, fh * 0.5), 180, 360, fill=style.hair)  # fringe

    for side in (-1, 1):
        ex, ey = side * style.eye_spacing / 2, style.eye_height
        brow_y = ey - 0.055 + side * style.brow_tilt
        draw.line(
            [
                (cx + (ex - 0.045) * big, cy + brow_y * big),
                (cx + (ex + 0.045) * big, cy + (brow_y - side * style.brow_tilt) * big),
            ],
            fill=tuple(int(c * 0.8) for c in style.hair),
            width=max(1, int(0.018 * big)),
        )
        half_h = 0.026 * max(eyes_open, 0.0)
        if half_h > 0.004:
            draw.ellipse(box(ex, ey, 0.045, half_h), fill=(250, 250, 250))
            draw.ellipse(box(ex, ey, 0.02, min(0.02, half_h)), fill=style.iris)
            draw.ellipse(box(ex, ey, 0.008, min(0.008, half_h)), fill=(10, 10, 10))
        else:
            draw.line(
                [(cx + (ex - 0.045) * big, cy + ey * big), (cx + (ex + 0.045) * big, cy + ey * big)],
                fill=tuple(int(c * 0.6) for c in style.skin),
                width=max(1, int(0.012 * big)),
            )

    nose = tuple(int(c * 0.8) for c in style.skin)
    draw.polygon(
        [(cx, cy + 0.0 * big), (cx - 0.025 * big, cy + 0.09 * big), (cx + 0.025 * big, cy + 0.09 * big)], fill=nose
    )

    mouth_y, mouth_w = 0.19, style.mouth_width / 2
    lip = 0.018
    inner = 0.004 + 0.075 * float(np.clip(opening, 0.0, 1.0))
    draw.ellipse(box(0, mouth_y, mouth_w, inner / 2 + lip), fill=style.lips)
    draw.ellipse(box(0, mouth_y, mouth_w * 0.8, inner / 2), fill=MOUTH_INSIDE)
    if opening > 0.45:
        draw.chord(box(0, mouth_y - inner / 2 + 0.012, mouth_w * 0.55, 0.014), 180, 360, fill=(240, 240, 235))
    x0, y0, x1, y1 = box(0, mouth_y, mouth_w, 0.075 / 2 + lip)
    image = image.resize((size, size), PIL.Image.LANCZOS)
    scale = size / big
    mouth_box = (
        max(0, int(math.floor(x0 * scale))),
        max(0, int(math.floor(y0 * scale))),
        min(size, int(math.ceil(x1 * scale))),
        min(size, int(math.ceil(y1 * scale))),
    )
    return image, mouth_box


def blink_track(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Eye opening per frame: open, with a blink (closing over ~4 frames) every 1.5-4 s."""
    eyes = np.ones(num_frames)
    frame = int(rng.integers(5, 60))
    while frame < num_frames:
        for k, value in enumerate((0.5, 0.0, 0.0, 0.5)):
            if frame + k < num_frames:
                eyes[frame + k] = value
        frame += int(rng.integers(38, 100))
    return eyes


def head_track(rng: np.random.Generator, num_frames: int, amount: float = 0.02) -> np.ndarray:
    """A small, smooth head motion: a sum of slow sines per axis, `(num_frames, 2)` in fractions of the size."""
    t = np.arange(num_frames) / FPS
    motion = np.zeros((num_frames, 2))
    for axis in range(2):
        for _ in range(3):
            motion[:, axis] += np.sin(2 * np.pi * rng.uniform(0.1, 0.6) * t + rng.uniform(0, 2 * np.pi))
    return amount * motion / 3


def render_clip(style: FaceStyle, opening: np.ndarray, eyes: np.ndarray, head: np.ndarray, size: int):
    frames, boxes = [], []
    for o, e, h in zip(opening, eyes, head):
        image, box = draw_face(style, float(o), float(e), (float(h[0]), float(h[1])), size)
        frames.append(np.asarray(image))
        boxes.append(box)
    return np.stack(frames), boxes


def make_clip(rng: np.random.Generator, size: int, voices: List[str], use_espeak: bool, max_seconds: float):
    style = FaceStyle.random(rng)
    waveform, speech_info = make_speech(rng, voices, use_espeak, max_seconds)
    num_frames = len(waveform) // SAMPLES_PER_FRAME
    opening = mouth_track(speech_envelope(waveform, num_frames))
    eyes = blink_track(rng, num_frames)
    head = head_track(rng, num_frames)
    frames, boxes = render_clip(style, opening, eyes, head, size)
    info = {
        "fps": FPS,
        "sampling_rate": SAMPLING_RATE,
        "num_frames": num_frames,
        "size": size,
        "mouth_boxes": [list(b) for b in boxes],
        "mouth_opening": [round(float(o), 4) for o in opening],
        "speech": speech_info,
        "style": asdict(style),
    }
    return frames, waveform, info


EXAMPLE_TEXT = "the quick brown fox jumps over the lazy dog"
EXAMPLE_SEED = 900_000  # outside the seed ranges of both splits


def make_examples(folder: str, size: int = 128) -> None:
    """The shipped example inputs: a face of an identity not used in training, with the mouth closed
    (`identity.png`, and its mouth box in `identity.json`), and a sentence in a voice not used in training
    (`speech.wav`, 16 kHz 16-bit; synthetic syllables where espeak-ng is missing)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(EXAMPLE_SEED)
    style = FaceStyle.random(rng)
    image, box = draw_face(style, 0.0, 1.0, (0.0, 0.0), size)
    image.save(os.path.join(folder, "identity.png"))
    with open(os.path.join(folder, "identity.json"), "w", encoding="utf-8") as f:
        json.dump({"size": size, "mouth_box": list(box), "style": asdict(style)}, f, indent=1)
    if espeak_available():
        waveform = espeak_speech(EXAMPLE_TEXT, EVAL_VOICES[1], pitch=45, speed=165)
    else:
        waveform = syllable_speech(rng, 2.4)
    waveform = 0.8 * waveform / max(np.abs(waveform).max(), 1e-6)
    lead_in = np.zeros(int(0.2 * SAMPLING_RATE), np.float32)
    soundfile.write(
        os.path.join(folder, "speech.wav"),
        np.concatenate([lead_in, waveform, lead_in]),
        SAMPLING_RATE,
        subtype="PCM_16",
    )
