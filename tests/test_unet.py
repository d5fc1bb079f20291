import collections
import math

import pytest
import torch

from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel, timestep_features

from helpers import TINY_UNET, read_manifest, tiny_unet


def _unet_inputs(unet, batch=2, seed=0):
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    return dict(
        sample=torch.randn(batch, cfg.in_channels, size, size, generator=g),
        timestep=torch.tensor([999, 3][:batch]),
        identity_frame=torch.rand(batch, cfg.in_channels, size, size, generator=g) * 2 - 1,
        motion_frames=torch.rand(batch, 2 * cfg.motion_frame_channels, size, size, generator=g) * 2 - 1,
        audio_embeddings=torch.randn(batch, cfg.audio_context, cfg.audio_embedding_dim, generator=g),
    )


def test_default_config_is_the_crema_checkpoint():
    with torch.device("meta"):
        unet = DiffusedHeadsUNetModel()
    assert sum(p.numel() for p in unet.parameters()) == 215_748_614
    assert not list(unet.buffers())
    # Every tensor of the released file has one home of the same size (1x1 convs stored as linear layers).
    squeeze = lambda shape: shape[:2] if len(shape) == 3 and shape[2] == 1 else shape  # noqa: E731
    manifest = collections.Counter(squeeze(shape) for _, shape in read_manifest("crema_unet_state_dict.tsv"))
    ours = collections.Counter(tuple(t.shape) for t in unet.state_dict().values())
    assert ours == manifest


def test_output_shape_and_values():
    unet = tiny_unet()
    out = unet(**_unet_inputs(unet))
    assert out.sample.shape == (2, 6, 16, 16)
    assert torch.isfinite(out.sample).all()
    # Conditioning matters: another audio window, identity frame or motion frame gives another prediction.
    for name in ("audio_embeddings", "identity_frame", "motion_frames"):
        inputs = _unet_inputs(unet)
        inputs[name] = inputs[name].flip(0)  # the other batch item's conditioning
        changed = (unet(**inputs).sample - out.sample).abs().amax(dim=(1, 2, 3))
        assert (changed > 1e-3).all(), (name, changed)
    assert unet(**_unet_inputs(unet), return_dict=False)[0].shape == (2, 6, 16, 16)


def test_batch_items_are_independent():
    unet = tiny_unet()
    inputs = _unet_inputs(unet)
    both = unet(**inputs).sample
    first = unet(**{k: v[:1] for k, v in inputs.items()}).sample
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-4)


def test_grayscale_motion_frames():
    unet = tiny_unet(motion_frame_channels=1)
    assert unet.conv_in.in_channels == 3 + 2 * 1 + 3
    out = unet(**_unet_inputs(unet)).sample
    assert out.shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="motion_frames"):
        unet(**{**_unet_inputs(unet), "motion_frames": torch.zeros(2, 6, 16, 16)})


def test_scalar_timestep_is_broadcast():
    unet = tiny_unet()
    inputs = _unet_inputs(unet)
    inputs["timestep"] = torch.tensor([7, 7])
    expected = unet(**inputs).sample
    for scalar in (7, torch.tensor(7)):
        torch.testing.assert_close(unet(**{**inputs, "timestep": scalar}).sample, expected)


def test_timestep_features_keep_the_released_frequencies():
    dim = 256
    t = torch.tensor([0.0, 1.0, 500.0])
    features = timestep_features(t, dim)
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 512.0)  # REFERENCE §2: divisor 2*C = 512, cos first
    args = t.double()[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(features.double(), expected, atol=2e-5, rtol=0)


def test_attention_matches_a_per_head_softmax():
    unet = tiny_unet()
    block = unet.mid_block.attention
    x = torch.randn(1, 32, 4, 4)
    heads, d = block.num_heads, block.head_dim
    h = block.group_norm(x).flatten(2).transpose(1, 2)  # (1, T, C)
    qkv = h @ block.to_qkv.weight.T + block.to_qkv.bias
    q, k, v = qkv.split(32, dim=-1)
    outs = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ v[..., sl])
    expected = x + (torch.cat(outs, -1) @ block.to_out.weight.T + block.to_out.bias).transpose(1, 2).reshape(
        1, 32, 4, 4
    )
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("audio_embeddings", torch.zeros(2, 4, 8), "audio_embeddings"),
        ("identity_frame", torch.zeros(2, 3, 8, 8), "identity_frame"),
        ("sample", torch.zeros(2, 3, 15, 15), "multiples"),
    ],
)
def test_bad_inputs_are_named(name, value, message):
    unet = tiny_unet()
    inputs = _unet_inputs(unet)
    if name == "sample":
        inputs = {k: (v[..., :15, :15] if v.ndim == 4 else v) for k, v in inputs.items()}
    inputs[name] = value
    with pytest.raises(ValueError, match=message):
        unet(**inputs)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="attention_levels"):
        DiffusedHeadsUNetModel(**{**TINY_UNET, "attention_levels": (True,)})
    with pytest.raises(ValueError, match="motion_frame_channels"):
        DiffusedHeadsUNetModel(**{**TINY_UNET, "motion_frame_channels": 2})
