"""Helpers the tests share: tiny models and pipelines, a speech-like signal, the reference manifests."""

import contextlib
import logging
import os
import socket

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler

from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline
from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel

from original_model import randomize_  # noqa: F401  (shared: gives weights non-trivial values)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    attention_head_dim=8,
    norm_num_groups=4,
    audio_embedding_dim=8,
)
TINY_ENCODER = dict(
    conv_channels=(4, 8),
    conv_kernel_sizes=(80, 4),
    conv_strides=(16, 2),
    conv_paddings=(32, 1),
    code_size=8,
    hidden_size=8,
    num_gru_layers=2,
)


def read_manifest(name):
    """(key, shape) pairs of a state-dict manifest in tests/fixtures."""
    rows = []
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        next(f)
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(DiffusedHeadsUNetModel(**{**TINY_UNET, **overrides}), seed).eval()


def tiny_audio_encoder(seed=1, **overrides):
    torch.manual_seed(seed)
    return randomize_(DiffusedHeadsAudioEncoder(**{**TINY_ENCODER, **overrides}), seed).eval()


def ddpm_scheduler():
    return DDPMScheduler.from_pretrained(os.path.join(ROOT, "scheduler"))  # the repository's own config


def tiny_pipeline(seed=0, unet=None, **unet_overrides):
    pipe = DiffusedHeadsPipeline(
        unet=unet if unet is not None else tiny_unet(seed, **unet_overrides),
        audio_encoder=tiny_audio_encoder(seed + 1),
        scheduler=ddpm_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speech_like(seconds=0.4, rate=16000, seed=0):
    """A deterministic, speech-like test signal: a modulated harmonic tone plus a little noise."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    tone = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    return (0.3 * envelope * tone + 0.01 * rng.randn(len(t))).astype(np.float32)


@contextlib.contextmanager
def logged():
    """What the package logs meanwhile, as the command line shows it: "warning: ..." and "note: ..." lines."""
    messages = []

    class Recorder(logging.Handler):
        def emit(self, record):
            messages.append(("warning: " if record.levelno >= logging.WARNING else "note: ") + record.getMessage())

    logger, recorder = logging.getLogger("diffused_heads"), Recorder(logging.DEBUG)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(recorder)
    try:
        yield messages
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)


def free_port() -> int:
    """A TCP port free on this machine now (for `accelerate launch --main_process_port` and servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pasted_and_beside(frame, image_path, model=None, max_size=1920, ring=12):
    """Where `--paste-back` writes in the photo `image_path` (aligned as the commands align it, scaled to
    `max_size` as they scale it): the mean difference (0-255) of a video frame from the photo inside the head's
    box, and in a ring of `ring` pixels just outside it (where the photo must be kept)."""
    from diffused_heads import runtime
    from diffused_heads.paste import PasteBack

    identity, aligned, photo = runtime.identity_frame(str(image_path), model=model, with_alignment=True)
    # The box at the photo's own size, scaled here by hand (not by the paste's own scaling, which is under test).
    x0, y0, x1, y1 = PasteBack(photo, aligned.matrix, identity.width, max_size=10**6).box
    factor = min(1.0, max_size / max(photo.size))
    x0, y0, x1, y1 = (round(v * factor) for v in (x0, y0, x1, y1))
    if factor < 1.0:
        photo = photo.resize((round(photo.width * factor), round(photo.height * factor)), PIL.Image.LANCZOS)
    frame = np.asarray(frame, np.float32)
    scaled = np.asarray(photo.convert("RGB"), np.float32)[: frame.shape[0], : frame.shape[1]]
    difference = np.abs(frame - scaled).mean(-1)
    inside = np.zeros(difference.shape, bool)
    inside[y0:y1, x0:x1] = True
    near = np.zeros(difference.shape, bool)
    near[max(0, y0 - ring) : y1 + ring, max(0, x0 - ring) : x1 + ring] = True
    return float(difference[inside].mean()), float(difference[near & ~inside].mean())
