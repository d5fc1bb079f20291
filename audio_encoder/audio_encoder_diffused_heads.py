# Copyright 2026 The Diffused Heads diffusers port authors.
# Licensed under the Apache License, Version 2.0.
"""The speech encoder used by Diffused Heads, as a diffusers model.

A 16 kHz waveform is cut into overlapping windows, one per video frame; a stack of strided 1-D
convolutions turns each window into a code, and a GRU run over the codes in time order gives one
audio embedding per frame.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

# Windows sent through the convolution stack at once; bounds memory on very long audio.
_CONV_CHUNK = 512


@dataclass
class DiffusedHeadsAudioEncoderOutput(BaseOutput):
    """
    Args:
        audio_embeddings (`torch.Tensor` of shape `(batch_size, num_frames, hidden_size)`):
            One embedding per video frame.
    """

    audio_embeddings: torch.Tensor


def conv_output_length(length: int, kernel_size: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel_size) // stride + 1


class DiffusedHeadsAudioEncoder(ModelMixin, ConfigMixin):
    r"""
    Speech encoder of Diffused Heads. The defaults are those of the released `audio_encoder.pt`.

    Parameters:
        sampling_rate (`int`, defaults to 16000): Sample rate of the waveform it takes.
        window_length (`int`, defaults to 3200): Samples per window (0.2 s).
        hop_length (`int`, defaults to 640): Samples between windows: one window per video frame (25 fps).
        conv_channels (`Tuple[int]`): Output channels of the strided convolutions (each followed by
            BatchNorm and ReLU).
        conv_kernel_sizes, conv_strides, conv_paddings (`Tuple[int]`): Their kernels, strides and paddings.
        code_size (`int`, defaults to 256): Size of the window code made by the last convolution (which
            spans what is left of the window) and Tanh.
        hidden_size (`int`, defaults to 256): Size of the GRU state and of the audio embeddings.
        num_gru_layers (`int`, defaults to 2): Layers of the GRU.
        batch_norm_statistics (`str`, defaults to `"running"`): What the BatchNorm layers normalise with:
            `"running"`, their stored running statistics (a module in eval mode), or `"window"`, each window's own
            mean and variance, which is what a file scripted in training mode computes when it is called one
            window at a time, as the original sampler does.
    """

    @register_to_config
    def __init__(
        self,
        sampling_rate: int = 16000,
        window_length: int = 3200,
        hop_length: int = 640,
        conv_channels: Tuple[int, ...] = (16, 32, 64, 128, 256),
        conv_kernel_sizes: Tuple[int, ...] = (80, 4, 4, 4, 10),
        conv_strides: Tuple[int, ...] = (16, 2, 2, 2, 5),
        conv_paddings: Tuple[int, ...] = (32, 1, 1, 1, 3),
        code_size: int = 256,
        hidden_size: int = 256,
        num_gru_layers: int = 2,
        batch_norm_statistics: str = "running",
    ):
        super().__init__()
        if batch_norm_statistics not in ("running", "window"):
            raise ValueError(f"batch_norm_statistics must be 'running' or 'window', got {batch_norm_statistics!r}")
        if not len(conv_channels) == len(conv_kernel_sizes) == len(conv_strides) == len(conv_paddings):
            raise ValueError(
                "conv_channels, conv_kernel_sizes, conv_strides and conv_paddings must have equal lengths"
            )

        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels, length = 1, window_length
        for out_channels, kernel, stride, padding in zip(
            conv_channels, conv_kernel_sizes, conv_strides, conv_paddings
        ):
            self.convs.append(nn.Conv1d(channels, out_channels, kernel, stride=stride, padding=padding))
            self.norms.append(nn.BatchNorm1d(out_channels))
            channels, length = out_channels, conv_output_length(length, kernel, stride, padding)
        if length < 1:
            raise ValueError(f"the convolution stack leaves nothing of a {window_length}-sample window")
        # The last convolution spans the remaining length, so every window gives one code.
        self.code_conv = nn.Conv1d(channels, code_size, length)
        self.gru = nn.GRU(code_size, hidden_size, num_gru_layers, batch_first=True)

    def num_frames(self, num_samples: int) -> int:
        """Number of video frames (= windows) for a waveform of `num_samples` samples."""
        cfg = self.config
        padded = num_samples + 2 * self.padding
        return max((padded - cfg.window_length) // cfg.hop_length + 1, 0)

    @property
    def padding(self) -> int:
        """Zeros added on each side of the waveform before cutting windows."""
        return (self.config.window_length - self.config.hop_length) // 2

    def windows(self, waveform: torch.Tensor) -> torch.Tensor:
        """Cut a `(batch_size, num_samples)` waveform into `(batch_size, num_frames, window_length)` windows."""
        padded = F.pad(waveform, (self.padding, self.padding))
        return padded.unfold(-1, self.config.window_length, self.config.hop_length)

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """The convolution stack: `(num_windows, window_length)` → `(num_windows, code_size)`."""
        hidden = windows[:, None]
        per_window = self.config.batch_norm_statistics == "window"
        for conv, norm in zip(self.convs, self.norms):
            hidden = conv(hidden)
            if per_window:  # batch statistics of a batch of one window: a per-window, per-channel normalisation
                hidden = F.instance_norm(hidden, weight=norm.weight, bias=norm.bias, eps=norm.eps)
            else:
                hidden = norm(hidden)
            hidden = F.relu(hidden)
        return torch.tanh(self.code_conv(hidden)).squeeze(-1)

    def forward(
        self, waveform: torch.Tensor, return_dict: bool = True
    ) -> Union[DiffusedHeadsAudioEncoderOutput, Tuple[torch.Tensor]]:
        r"""
        Args:
            waveform (`torch.Tensor`): Mono audio at `sampling_rate` in [-1, 1], `(batch_size, num_samples)`
                or `(num_samples,)`.
            return_dict (`bool`, defaults to `True`): Return a [`DiffusedHeadsAudioEncoderOutput`] or a tuple.

        Returns:
            The audio embeddings, `(batch_size, num_frames, hidden_size)`, one per video frame.
        """
        if waveform.ndim == 1:
            waveform = waveform[None]
        if waveform.ndim != 2:
            raise ValueError(f"`waveform` must have shape (batch_size, num_samples), got {tuple(waveform.shape)}")
        if self.num_frames(waveform.shape[-1]) < 1:
            raise ValueError(
                f"`waveform` has {waveform.shape[-1]} samples, too short for one video frame "
                f"(at least {self.config.window_length - 2 * self.padding} samples are needed)"
            )
        dtype = self.convs[0].weight.dtype
        windows = self.windows(waveform.to(dtype))  # a view: the windows overlap in memory
        batch, num_frames, _ = windows.shape
        # The convolutions run on a few hundred windows at a time, so long speech needs no copy of all of them.
        per_chunk = max(1, _CONV_CHUNK // batch)
        codes = torch.cat(
            [
                self.encode_windows(windows[:, start : start + per_chunk].reshape(-1, windows.shape[-1])).reshape(
                    batch, -1, self.config.code_size
                )
                for start in range(0, num_frames, per_chunk)
            ],
            dim=1,
        )
        embeddings, _ = self.gru(codes)

        if not return_dict:
            return (embeddings,)
        return DiffusedHeadsAudioEncoderOutput(audio_embeddings=embeddings)


class AudioEmbeddingStream:
    """The encoder's embeddings of speech that arrives in parts: `push` 16 kHz samples and get the embeddings of the
    windows they complete, `end` to pad the end as the whole-clip call does and get the rest.

    The windows are cut from the same padded signal as in `DiffusedHeadsAudioEncoder.forward` and the GRU's state is
    carried from one part to the next, so the embeddings are those of the whole clip (to float rounding), each part
    costs only its own windows, and what is kept does not grow with the length of the speech. Window `k` is complete
    once `k * hop_length + window_length - padding` samples are in (1,920 samples, 120 ms, after the start of frame
    `k` for the released encoder). `snapshot` and `restore` go back to an earlier point (the live session's
    barge-in)."""

    def __init__(self, encoder: DiffusedHeadsAudioEncoder, device: Union[str, torch.device, None] = None):
        self.encoder = encoder
        self.device = torch.device(device) if device is not None else encoder.device
        self.samples = torch.zeros(encoder.padding)  # the padded signal from the next window's start on
        self.windows = 0  # windows encoded so far
        self.received = 0  # samples pushed so far
        self.hidden = None  # the GRU's state after the last window
        self.ended = False

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """The embeddings `(num_new_windows, hidden_size)` of the windows that `samples` (1-D, 16 kHz) complete."""
        if self.ended:
            raise RuntimeError("this speech stream has ended")
        samples = samples.detach().float().cpu().reshape(-1)
        self.samples = torch.cat([self.samples, samples])
        self.received += samples.numel()
        return self._encode()

    def end(self) -> torch.Tensor:
        """The embeddings of the last windows, the end padded with zeros as in the whole-clip call."""
        if self.ended:
            raise RuntimeError("this speech stream has ended")
        self.ended = True
        self.samples = torch.cat([self.samples, torch.zeros(self.encoder.padding)])
        return self._encode()

    @property
    def num_frames(self) -> Optional[int]:
        """The number of windows (video frames) of the whole speech, once it has ended; else None."""
        return self.encoder.num_frames(self.received) if self.ended else None

    def _encode(self) -> torch.Tensor:
        config = self.encoder.config
        count = max(0, (self.samples.numel() - config.window_length) // config.hop_length + 1)
        if count == 0:
            return torch.zeros(0, config.hidden_size, device=self.device)
        windows = self.samples.unfold(0, config.window_length, config.hop_length)[:count]
        dtype = self.encoder.convs[0].weight.dtype
        codes = torch.cat(
            [
                self.encoder.encode_windows(windows[start : start + _CONV_CHUNK].to(self.device, dtype))
                for start in range(0, count, _CONV_CHUNK)
            ]
        )
        embeddings, self.hidden = self.encoder.gru(codes[None], self.hidden)
        self.samples = self.samples[count * config.hop_length :]
        self.windows += count
        return embeddings[0]

    def snapshot(self) -> dict:
        """The stream's state now, for `restore` (small: the samples of one window and the GRU's state)."""
        return dict(samples=self.samples, windows=self.windows, received=self.received, hidden=self.hidden)

    def restore(self, state: dict) -> None:
        """Go back to a `snapshot`: what was pushed after it is forgotten."""
        self.samples, self.windows = state["samples"], state["windows"]
        self.received, self.hidden, self.ended = state["received"], state["hidden"], False
