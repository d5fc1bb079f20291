"""Diffused Heads (WACV 2024) talking-face generation as a diffusers pipeline, with its tools.

    from diffused_heads import DiffusedHeadsPipeline, builtin_model_path, load_audio, load_identity_frame

The pipeline and its two components are the files of the Hub model repository (installed as
`diffused_heads.hub`); media helpers, training, evaluation and the `diffused-heads` command live beside them.
Names are imported on first use, so `import diffused_heads` stays cheap.
"""

import importlib
import os
from typing import Any

__version__ = "0.2.0"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "DiffusedHeadsPipeline": ".hub.pipeline_diffused_heads",
    "DiffusedHeadsPipelineOutput": ".hub.pipeline_diffused_heads",
    "DiffusedHeadsUNetModel": ".hub.unet.unet_diffused_heads",
    "DiffusedHeadsAudioEncoder": ".hub.audio_encoder.audio_encoder_diffused_heads",
    "load_identity_frame": ".media",
    "load_audio": ".media",
    "export_to_video_with_audio": ".media",
    "save_frames": ".media",
    "MediaError": ".media",
    "prepare_identity": ".faces",
    "IdentityTemplate": ".faces",
}

__all__ = sorted(_EXPORTS) + [
    "BUILTIN_MODELS",
    "builtin_model_path",
    "example_image_path",
    "example_audio_path",
    "__version__",
]


# The built-in demo models by name (their folders in the package): the model trained on drawn faces, sampled with
# DDPM at 10 steps a frame, and its 2-step student.
BUILTIN_MODELS = {"builtin-fast": "builtin_fast", "builtin-ddpm": "builtin"}
DEFAULT_BUILTIN_MODEL = "builtin-fast"


def builtin_model_path(name: str = DEFAULT_BUILTIN_MODEL) -> str:
    """The folder of a built-in demo model (a small UNet and audio encoder trained on drawn faces): `"builtin-fast"`
    (the default: 2 UNet evaluations a frame) or `"builtin-ddpm"` (its 10-step teacher).

    It loads with `DiffusedHeadsPipeline.from_pretrained(builtin_model_path())` and with
    `DiffusionPipeline.from_pretrained(builtin_model_path(), trust_remote_code=True)`."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"name must be one of {', '.join(BUILTIN_MODELS)}, got {name!r}")
    return os.path.join(_PACKAGE_DIR, BUILTIN_MODELS[name])


def example_image_path() -> str:
    """The example identity frame made for the built-in model (a drawn face on green, 128x128 PNG)."""
    return os.path.join(_PACKAGE_DIR, "examples", "identity.png")


def example_audio_path() -> str:
    """The example speech for the built-in model (3.4 s, 16 kHz WAV)."""
    return os.path.join(_PACKAGE_DIR, "examples", "speech.wav")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
