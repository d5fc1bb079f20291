# Copyright 2026 The Diffused Heads diffusers port authors.
# Licensed under the Apache License, Version 2.0.
"""The Diffused Heads denoising UNet (WACV 2024) as a diffusers model.

A guided-diffusion style UNet that predicts the noise and a variance interpolation value for one
video frame, conditioned on the identity frame and two motion frames (concatenated to the noisy
frame along the channels), the diffusion timestep and a window of audio embeddings (both through
scale-shift modulation in every residual block).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

NUM_MOTION_FRAMES = 2


@dataclass
class DiffusedHeadsUNetOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The predicted noise followed by the variance interpolation values (for `out_channels=6`).
    """

    sample: torch.Tensor


def timestep_features(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep features, cosines first, of shape `(batch_size, dim)`."""
    half = dim // 2
    # The divisor is 2 * dim rather than half: an oddity of the released model, kept for parity.
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (2 * dim)
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditioningEmbedding(nn.Module):
    """Linear → SiLU → Linear, used for both the timestep features and the flattened audio window."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Residual block with timestep scale-shift after the second norm and a second audio scale-shift.

    `resample` is `"down"` (2×2 average pooling), `"up"` (nearest ×2) or `None`; it is applied to both
    the main and the skip path, between the first activation and the first convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        norm_num_groups: int,
        dropout: float,
        resample: Optional[str] = None,
    ):
        super().__init__()
        self.resample = resample
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(embedding_dim, 2 * out_channels)
        self.audio_emb_proj = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        # time_emb and audio_emb arrive already passed through SiLU (shared by all blocks).
        hidden = F.silu(self.norm1(x))
        hidden = self.conv1(self._resample(hidden))
        x = self._resample(x)

        scale, shift = self.time_emb_proj(time_emb)[:, :, None, None].chunk(2, dim=1)
        hidden = self.norm2(hidden) * (1 + scale) + shift
        audio_scale, audio_shift = self.audio_emb_proj(audio_emb)[:, :, None, None].chunk(2, dim=1)
        hidden = hidden * (1 + audio_scale) + audio_shift
        hidden = self.conv2(self.dropout(F.silu(hidden)))

        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + hidden


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection.

    `to_qkv` holds all heads' queries, then all keys, then all values (the released checkpoint stores
    them per head; the converter reorders them).
    """

    def __init__(self, channels: int, head_dim: int, norm_num_groups: int):
        super().__init__()
        if channels % head_dim != 0:
            raise ValueError(f"attention channels ({channels}) must be a multiple of attention_head_dim ({head_dim})")
        self.num_heads = channels // head_dim
        self.head_dim = head_dim
        self.group_norm = nn.GroupNorm(norm_num_groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        hidden = self.group_norm(x).flatten(2).transpose(1, 2)
        qkv = self.to_qkv(hidden).view(batch, height * width, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        hidden = F.scaled_dot_product_attention(query, key, value)
        hidden = self.to_out(hidden.transpose(1, 2).reshape(batch, height * width, channels))
        return x + hidden.transpose(1, 2).reshape(batch, channels, height, width)


class DownBlock(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        num_layers,
        embedding_dim,
        groups,
        dropout,
        attention_head_dim,
        add_attention: bool,
        add_downsample: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, embedding_dim, groups, dropout)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, attention_head_dim, groups) for _ in range(num_layers if add_attention else 0)
        )
        self.downsampler = (
            ResnetBlock(out_channels, out_channels, embedding_dim, groups, dropout, resample="down")
            if add_downsample
            else None
        )

    def forward(self, hidden, time_emb, audio_emb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            hidden = resnet(hidden, time_emb, audio_emb)
            if self.attentions:
                hidden = self.attentions[i](hidden)
            skips.append(hidden)
        if self.downsampler is not None:
            hidden = self.downsampler(hidden, time_emb, audio_emb)
            skips.append(hidden)
        return hidden, skips


class UpBlock(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        skip_channels,
        embedding_dim,
        groups,
        dropout,
        attention_head_dim,
        add_attention: bool,
        add_upsample: bool,
    ):
        super().__init__()
        channels = [in_channels] + [out_channels] * (len(skip_channels) - 1)
        self.resnets = nn.ModuleList(
            ResnetBlock(ch + skip, out_channels, embedding_dim, groups, dropout)
            for ch, skip in zip(channels, skip_channels)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, attention_head_dim, groups)
            for _ in range(len(skip_channels) if add_attention else 0)
        )
        self.upsampler = (
            ResnetBlock(out_channels, out_channels, embedding_dim, groups, dropout, resample="up")
            if add_upsample
            else None
        )

    def forward(self, hidden, skips, time_emb, audio_emb):
        for i, resnet in enumerate(self.resnets):
            hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), time_emb, audio_emb)
            if self.attentions:
                hidden = self.attentions[i](hidden)
        if self.upsampler is not None:
            hidden = self.upsampler(hidden, time_emb, audio_emb)
        return hidden


class MidBlock(nn.Module):
    def __init__(self, channels, embedding_dim, groups, dropout, attention_head_dim):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, embedding_dim, groups, dropout) for _ in range(2))
        self.attention = AttentionBlock(channels, attention_head_dim, groups)

    def forward(self, hidden, time_emb, audio_emb):
        hidden = self.resnets[0](hidden, time_emb, audio_emb)
        hidden = self.attention(hidden)
        return self.resnets[1](hidden, time_emb, audio_emb)


class DiffusedHeadsUNetModel(ModelMixin, ConfigMixin):
    r"""
    The denoising UNet of Diffused Heads. The defaults are those of the released CREMA-D checkpoint
    (215,748,614 parameters).

    Parameters:
        sample_size (`int`, defaults to 128): Height and width of the frames.
        in_channels (`int`, defaults to 3): Channels of the noisy frame and of the identity frame.
        out_channels (`int`, defaults to 6): Output channels: the noise, then (if `2 * in_channels`) the
            variance interpolation values of a learned-range variance.
        motion_frame_channels (`int`, defaults to 3): Channels of each of the two motion frames: 3 (RGB)
            or 1 (grayscale).
        block_out_channels (`Tuple[int]`, defaults to `(256, 512, 768)`): Width of each resolution level.
        layers_per_block (`int`, defaults to 2): Residual blocks per level on the way down (one more up).
        attention_levels (`Tuple[bool]`, defaults to `(False, False, True)`): Which levels have
            self-attention after each residual block. The middle block always has it.
        attention_head_dim (`int`, defaults to 64): Channels per attention head.
        audio_context (`int`, defaults to 5): Number of audio embeddings per frame (frames i-2 … i+2).
        audio_embedding_dim (`int`, defaults to 256): Size of one audio embedding.
        norm_num_groups (`int`, defaults to 32): Groups of every GroupNorm.
        dropout (`float`, defaults to 0.1): Dropout in the residual blocks (training only).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        in_channels: int = 3,
        out_channels: int = 6,
        motion_frame_channels: int = 3,
        block_out_channels: Tuple[int, ...] = (256, 512, 768),
        layers_per_block: int = 2,
        attention_levels: Tuple[bool, ...] = (False, False, True),
        attention_head_dim: int = 64,
        audio_context: int = 5,
        audio_embedding_dim: int = 256,
        norm_num_groups: int = 32,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels ({len(attention_levels)} entries) must have one entry per level of "
                f"block_out_channels ({len(block_out_channels)} levels)"
            )
        if motion_frame_channels not in (1, in_channels):
            raise ValueError(f"motion_frame_channels must be 1 or {in_channels}, got {motion_frame_channels}")
        if sample_size % 2 ** (len(block_out_channels) - 1) != 0:
            raise ValueError(
                f"sample_size ({sample_size}) must be divisible by {2 ** (len(block_out_channels) - 1)} "
                f"for {len(block_out_channels)} levels"
            )

        base = block_out_channels[0]
        embedding_dim = 4 * base
        groups = norm_num_groups
        conv_in_channels = 2 * in_channels + NUM_MOTION_FRAMES * motion_frame_channels

        self.time_embedding = ConditioningEmbedding(base, embedding_dim)
        self.audio_embedding = ConditioningEmbedding(audio_context * audio_embedding_dim, embedding_dim)
        self.conv_in = nn.Conv2d(conv_in_channels, base, 3, padding=1)

        skip_channels = [base]
        self.down_blocks = nn.ModuleList()
        channels = base
        for level, width in enumerate(block_out_channels):
            is_last = level == len(block_out_channels) - 1
            self.down_blocks.append(
                DownBlock(
                    channels,
                    width,
                    layers_per_block,
                    embedding_dim,
                    groups,
                    dropout,
                    attention_head_dim,
                    attention_levels[level],
                    add_downsample=not is_last,
                )
            )
            channels = width
            skip_channels += [width] * (layers_per_block + (0 if is_last else 1))

        self.mid_block = MidBlock(channels, embedding_dim, groups, dropout, attention_head_dim)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(block_out_channels))):
            width = block_out_channels[level]
            level_skips = [skip_channels.pop() for _ in range(layers_per_block + 1)]
            self.up_blocks.append(
                UpBlock(
                    channels,
                    width,
                    level_skips,
                    embedding_dim,
                    groups,
                    dropout,
                    attention_head_dim,
                    attention_levels[level],
                    add_upsample=level > 0,
                )
            )
            channels = width

        self.conv_norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        identity_frame: torch.Tensor,
        motion_frames: torch.Tensor,
        audio_embeddings: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[DiffusedHeadsUNetOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            sample (`torch.Tensor`): The noisy frame, `(batch_size, in_channels, height, width)`.
            timestep (`torch.Tensor`, `float` or `int`): The diffusion timestep(s), a scalar or `(batch_size,)`.
            identity_frame (`torch.Tensor`): The identity frame in [-1, 1], same shape as `sample`.
            motion_frames (`torch.Tensor`): The two previous frames, oldest first, concatenated along the
                channels: `(batch_size, 2 * motion_frame_channels, height, width)`.
            audio_embeddings (`torch.Tensor`): The audio embeddings of frames i-2 … i+2 in time order,
                `(batch_size, audio_context, audio_embedding_dim)`.
            return_dict (`bool`, defaults to `True`): Return a [`DiffusedHeadsUNetOutput`] or a tuple.
        """
        self._check_inputs(sample, identity_frame, motion_frames, audio_embeddings)
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        timestep = timestep.reshape(-1).to(sample.device).expand(batch)

        time_emb = self.time_embedding(timestep_features(timestep, self.config.block_out_channels[0]).to(sample.dtype))
        audio_emb = self.audio_embedding(audio_embeddings.reshape(batch, -1).to(sample.dtype))
        # Every block applies SiLU to the embeddings before its projection: do it once here.
        time_emb, audio_emb = F.silu(time_emb), F.silu(audio_emb)

        hidden = self.conv_in(torch.cat([sample, motion_frames, identity_frame], dim=1))
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, time_emb, audio_emb)
            skips.extend(block_skips)
        hidden = self.mid_block(hidden, time_emb, audio_emb)
        for block in self.up_blocks:
            hidden = block(hidden, skips, time_emb, audio_emb)
        hidden = self.conv_out(F.silu(self.conv_norm_out(hidden)))

        if not return_dict:
            return (hidden,)
        return DiffusedHeadsUNetOutput(sample=hidden)

    def _check_inputs(self, sample, identity_frame, motion_frames, audio_embeddings):
        cfg = self.config
        expected = {
            "sample": (sample, (cfg.in_channels,)),
            "identity_frame": (identity_frame, (cfg.in_channels,)),
            "motion_frames": (motion_frames, (NUM_MOTION_FRAMES * cfg.motion_frame_channels,)),
        }
        for name, (tensor, (channels,)) in expected.items():
            if tensor.ndim != 4 or tensor.shape[1] != channels or tensor.shape[0] != sample.shape[0]:
                raise ValueError(
                    f"`{name}` must have shape (batch_size={sample.shape[0]}, {channels}, height, width), "
                    f"got {tuple(tensor.shape)}"
                )
            if tensor.shape[-2:] != sample.shape[-2:]:
                raise ValueError(f"`{name}` has size {tuple(tensor.shape[-2:])}, `sample` {tuple(sample.shape[-2:])}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {tuple(sample.shape[-2:])}")
        if audio_embeddings.shape != (sample.shape[0], cfg.audio_context, cfg.audio_embedding_dim):
            raise ValueError(
                f"`audio_embeddings` must have shape (batch_size={sample.shape[0]}, "
                f"audio_context={cfg.audio_context}, audio_embedding_dim={cfg.audio_embedding_dim}), "
                f"got {tuple(audio_embeddings.shape)}"
            )
