"""Fixtures for every test (helpers to import live in helpers.py)."""

import numpy as np
import pytest
import torch

from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The command-line tools set torch's thread count for their process; keep each test's change to itself."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def identity_image():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(24, 20, 3), dtype=np.uint8)


@pytest.fixture
def stream_calls(monkeypatch):
    """What every `pipe.stream` call received: the pipeline's state at that moment, and its arguments."""
    recorded = []
    real_stream = DiffusedHeadsPipeline.stream

    def recording_stream(self, identity_image, audio, **kwargs):
        recorded.append(
            dict(
                scheduler=self.scheduler,
                unet_dtype=self.unet.dtype,
                unet=self.unet,
                threads=torch.get_num_threads(),
                identity=identity_image,
                audio=audio,
                **kwargs,
            )
        )
        return real_stream(self, identity_image, audio, **kwargs)

    monkeypatch.setattr(DiffusedHeadsPipeline, "stream", recording_stream)
    return recorded
