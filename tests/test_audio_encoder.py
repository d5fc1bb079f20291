import numpy as np
import pytest
import torch

from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder

from helpers import read_manifest, speech_like, tiny_audio_encoder


def per_window_protocol(encoder, waveform):
    """The released protocol, restated: zero-pad 1280 samples each side, cut 3200-sample windows every 640,
    and run one window per call with the GRU state carried from zeros."""
    padded = np.concatenate([np.zeros(1280), waveform, np.zeros(1280)])
    count = (len(padded) - 3200) // 640 + 1
    state = torch.zeros(encoder.config.num_gru_layers, 1, encoder.config.hidden_size)
    outputs = []
    for i in range(count):
        window = torch.tensor(padded[i * 640 : i * 640 + 3200], dtype=torch.float32)[None]
        code = encoder.encode_windows(window)
        out, state = encoder.gru(code[:, None], state)
        outputs.append(out[:, 0])
    return torch.cat(outputs)


@pytest.mark.parametrize("num_samples", [640, 3200, 6400, 16000 + 123])
def test_batched_equals_one_window_per_call(num_samples):
    encoder = tiny_audio_encoder()
    waveform = speech_like(num_samples / 16000, seed=num_samples)
    with torch.no_grad():
        batched = encoder(torch.from_numpy(waveform)[None]).audio_embeddings[0]
        reference = per_window_protocol(encoder, waveform)
    assert batched.shape == ((num_samples + 2560 - 3200) // 640 + 1, 8)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)


def test_frame_count_rule():
    encoder = tiny_audio_encoder()
    for n in (640, 1000, 1279, 16000, 144000):
        assert encoder.num_frames(n) == (n + 2560 - 3200) // 640 + 1
    assert encoder.num_frames(639) == 0
    with pytest.raises(ValueError, match="too short"):
        encoder(torch.zeros(1, 100))


def test_batch_of_clips_equals_clips_alone():
    encoder = tiny_audio_encoder()
    clips = torch.stack([torch.from_numpy(speech_like(0.5, seed=s)) for s in range(3)])
    with torch.no_grad():
        together = encoder(clips).audio_embeddings
        alone = torch.cat([encoder(c[None]).audio_embeddings for c in clips])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_default_config_is_the_released_encoder():
    with torch.device("meta"):
        encoder = DiffusedHeadsAudioEncoder()
    assert sum(p.numel() for p in encoder.parameters()) == 1_490_896
    assert sum(b.numel() for b in encoder.buffers()) == 997
    manifest = sorted(shape for _, shape in read_manifest("audio_encoder_state_dict.tsv"))
    assert sorted(tuple(t.shape) for t in encoder.state_dict().values()) == manifest
    assert encoder.code_conv.kernel_size == (5,)
