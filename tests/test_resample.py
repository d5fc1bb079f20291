import numpy as np
import pytest
import torch
from scipy.signal import resample_poly

from diffused_heads.hub.pipeline_diffused_heads import resample_audio


def dominant_frequency(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 44101, 96000])
def test_sine_keeps_its_frequency_and_level(rate):
    t = np.arange(rate) / rate
    sine = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample_audio(torch.from_numpy(sine), rate, 16000).numpy()
    assert len(out) == int(np.ceil(rate * 16000 / rate))
    assert abs(dominant_frequency(out, 16000) - 440) <= 1.0
    middle = out[2000:-2000]
    assert abs(np.sqrt(np.mean(middle**2)) - np.sqrt(0.5)) < 0.01


def test_agrees_with_scipy_polyphase_resampling():
    rng = np.random.RandomState(0)
    t = np.arange(44100) / 44100
    signal = sum(np.sin(2 * np.pi * f * t + rng.rand()) for f in (200, 1500, 3900))
    ours = resample_audio(torch.from_numpy(signal), 44100, 16000).numpy()
    reference = resample_poly(signal, 160, 441)
    np.testing.assert_allclose(ours[1000:-1000], reference[1000:-1000], atol=0.02)


def test_frequencies_above_the_new_nyquist_are_removed():
    t = np.arange(48000) / 48000
    alias = np.sin(2 * np.pi * 11000 * t)  # would fold to 5 kHz without a low-pass
    out = resample_audio(torch.from_numpy(alias), 48000, 16000).numpy()
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) < 0.01


def test_batch_dims_and_identity():
    x = torch.randn(2, 3, 1000)
    assert resample_audio(x, 16000, 16000) is x
    assert resample_audio(x, 8000, 16000).shape == (2, 3, 2000)
