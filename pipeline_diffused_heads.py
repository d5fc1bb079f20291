# Copyright 2026 The Diffused Heads diffusers port authors.
# Licensed under the Apache License, Version 2.0.
"""Diffused Heads (WACV 2024): a talking-face video from one identity frame and a speech recording."""

import contextvars
import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]
AudioInput = Union[np.ndarray, torch.Tensor]

# ITU-R 601 luma weights, as used for grayscale motion frames in training.
_LUMA = (0.2989, 0.587, 0.114)


def to_motion_frame(frames: torch.Tensor, channels: int) -> torch.Tensor:
    """`(B, 3, H, W)` frames in [-1, 1] as motion frames of `channels` channels (1: grayscale, 3: as they are)."""
    if channels == 1:
        weights = torch.tensor(_LUMA, dtype=frames.dtype, device=frames.device)
        return (frames * weights[None, :, None, None]).sum(dim=1, keepdim=True)
    return frames


def audio_window(
    embeddings: torch.Tensor, frame_index: int, context: int, num_frames: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The `context` audio embeddings centred on video frame `frame_index`, clamped at the clip's ends.

    `embeddings` is `(..., num_frames, dim)`; the result is `(..., context, dim)`. For a batch `(batch_size,
    frames, dim)` of clips of different lengths, `num_frames` `(batch_size,)` clamps each clip at its own end."""
    offsets = torch.arange(context, device=embeddings.device) - context // 2
    indices = (frame_index + offsets).clamp(0, embeddings.shape[-2] - 1)
    if num_frames is None:
        return embeddings[..., indices, :]
    last = num_frames.to(embeddings.device)[:, None] - 1
    indices = torch.minimum(indices[None], last)
    return torch.gather(embeddings, 1, indices[..., None].expand(-1, -1, embeddings.shape[-1]))


# The released sampler's steps per frame, for a model that names none of its own.
DEFAULT_NUM_INFERENCE_STEPS = 100

# The released sampler (REFERENCE: the original `sample.py`) as a diffusers DDPMScheduler configuration.
ORIGINAL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    variance_type="learned_range",
    clip_sample=True,
    clip_sample_range=1.0,
    prediction_type="epsilon",
    timestep_spacing="linspace",
)


@dataclass
class DiffusedHeadsPipelineOutput(BaseOutput):
    """
    Args:
        frames (`np.ndarray`, `torch.Tensor` or `List[List[PIL.Image.Image]]`):
            The generated videos: for `"np"` a float32 array `(batch_size, num_frames, height, width, 3)` in
            [0, 1]; for `"pt"` a tensor `(batch_size, num_frames, 3, height, width)` in [0, 1]; for `"pil"` one
            list of images per video. For clips of different lengths `num_frames` is the longest video's, a
            shorter video's frames after its end are black (zeros), and its own length is in `num_frames`
            (`frames[k][: out.num_frames[k]]`); `"pil"` lists hold each video's own frames only.
        audio (`np.ndarray`): The 16 kHz mono audio the videos were made from, `(batch_size, num_samples)`,
            25 frames per second of it; a shorter clip is followed by silence up to the longest (its own length:
            `num_samples`).
        num_frames (`List[int]`): How many frames each video has.
        num_samples (`List[int]`): How many audio samples each video's clip has.
    """

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]
    audio: np.ndarray
    num_frames: Optional[List[int]] = None
    num_samples: Optional[List[int]] = None


class _SincKernel:
    """The band-limited interpolation between two sample rates that `resample_audio` and `StreamingResampler` share:
    each output sample is a Hann-windowed sinc interpolation of the input at its exact position, with the cut-off at
    `rolloff` times the lower of the two Nyquist frequencies and `lowpass_width` zero crossings on each side."""

    def __init__(self, orig_freq: float, new_freq: float, lowpass_width: int = 6, rolloff: float = 0.99):
        if orig_freq <= 0 or new_freq <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_freq} and {new_freq}")
        self.ratio = new_freq / orig_freq
        self.cutoff = min(1.0, self.ratio) * rolloff  # in units of the input Nyquist band
        self.half_width = lowpass_width / self.cutoff  # window half width, in input samples
        self.reach = math.ceil(self.half_width)  # input samples after an output's position that it reads
        self.taps = torch.arange(-self.reach + 1, self.reach + 1)

    def num_outputs(self, num_inputs: int) -> int:
        return math.ceil(num_inputs * self.ratio)

    def last_input(self, output_index: int) -> int:
        """The last input sample that output `output_index` reads."""
        return math.floor(output_index / self.ratio) + self.reach

    def __call__(self, signal: torch.Tensor, first: int, start: int, stop: int) -> torch.Tensor:
        """Outputs `start:stop` of `signal` `(rows, length)` in float64, which holds the input samples `first,
        first + 1, ...` (zeros outside it)."""
        pad = self.reach + 1
        padded = F.pad(signal, (pad, pad))
        chunk = max(1, (1 << 22) // len(self.taps))
        outputs = []
        for begin in range(start, stop, chunk):
            positions = torch.arange(begin, min(begin + chunk, stop), dtype=torch.float64) / self.ratio
            index = positions.floor().long()[:, None] + self.taps[None]
            distance = positions[:, None] - index
            window = torch.where(
                distance.abs() < self.half_width, torch.cos(distance * (math.pi / (2 * self.half_width))) ** 2, 0.0
            )
            kernel = self.cutoff * torch.sinc(self.cutoff * distance) * window
            outputs.append((padded[:, (index - first + pad).clamp(0, padded.shape[-1] - 1)] * kernel).sum(-1))
        return torch.cat(outputs, dim=-1) if outputs else signal[:, :0]


def resample_audio(
    waveform: torch.Tensor, orig_freq: float, new_freq: float, lowpass_width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Band-limited resampling of `(..., num_samples)` audio between any two sample rates (any ratio, non-integer
    rates included; see `_SincKernel`)."""
    kernel = _SincKernel(orig_freq, new_freq, lowpass_width, rolloff)
    if orig_freq == new_freq:
        return waveform
    shape, num_samples = waveform.shape[:-1], waveform.shape[-1]
    signal = waveform.reshape(-1, num_samples).to(torch.float64).cpu()
    num_out = kernel.num_outputs(num_samples)
    return kernel(signal, 0, 0, num_out).to(device=waveform.device, dtype=waveform.dtype).reshape(*shape, num_out)


class StreamingResampler:
    """`resample_audio` for audio that arrives in chunks: `push` gives the output samples whose inputs are all in,
    `end` the rest; together they are the samples `resample_audio` gives for the whole signal."""

    def __init__(self, orig_freq: float, new_freq: float):
        self.kernel = _SincKernel(orig_freq, new_freq)
        self.same = orig_freq == new_freq
        self.buffer = torch.zeros(1, 0, dtype=torch.float64)
        self.first = 0  # the input index of buffer[0]
        self.received = 0
        self.emitted = 0

    def _emit(self, stop: int) -> torch.Tensor:
        out = self.kernel(self.buffer, self.first, self.emitted, stop)[0] if stop > self.emitted else None
        self.emitted = max(self.emitted, stop)
        # Keep only the inputs that later outputs still read.
        keep_from = max(self.first, math.floor(self.emitted / self.kernel.ratio) - self.kernel.reach)
        self.buffer, self.first = self.buffer[:, keep_from - self.first :], keep_from
        return out.float() if out is not None else torch.zeros(0)

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        if self.same:
            return samples.float()
        self.buffer = torch.cat([self.buffer, samples.to(torch.float64)[None]], dim=1)
        self.received += samples.shape[-1]
        # The outputs whose last input is in: last_input(j) < received.
        ready = max(0, math.ceil((self.received - self.kernel.reach) * self.kernel.ratio))
        while ready > 0 and self.kernel.last_input(ready - 1) >= self.received:
            ready -= 1
        return self._emit(min(ready, self.kernel.num_outputs(self.received)))

    def end(self) -> torch.Tensor:
        if self.same:
            return torch.zeros(0)
        return self._emit(self.kernel.num_outputs(self.received))


def _package_modules() -> Dict[str, str]:
    """`{file stem: module name}` of the components in the installed `diffused_heads` package, imported, when this
    file is imported from it; empty when it is loaded as remote code (`trust_remote_code=True`), where the classes
    come from the files stored beside the weights."""
    import importlib

    if not __package__:
        return {}
    modules = {}
    for relative in (".unet.unet_diffused_heads", ".audio_encoder.audio_encoder_diffused_heads"):
        try:
            module = importlib.import_module(relative, __package__)
        except ImportError:
            return {}
        modules[relative.rsplit(".", 1)[1]] = module.__name__
    return modules


def check_output_type(output_type: str) -> None:
    if output_type not in ("np", "pt", "pil", "latent"):
        raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', got {output_type!r}")


def scheduler_uses_variance(scheduler: SchedulerMixin) -> bool:
    """Whether a scheduler is given the model's variance channels too: only the DDPM schedulers use them.

    `from_config` copies `variance_type` into schedulers that ignore it, and DPM-Solver accepts a learned
    variance but drops it (and fails on it with v-prediction), so every other scheduler gets the first channels
    only."""
    from diffusers import DDPMParallelScheduler, DDPMScheduler

    is_ddpm = isinstance(scheduler, (DDPMScheduler, DDPMParallelScheduler))
    return is_ddpm and scheduler.config.get("variance_type") in ("learned", "learned_range")


def accepts_timesteps(scheduler: SchedulerMixin) -> bool:
    """Whether a scheduler's `set_timesteps` takes a list of custom timesteps (DDPM, LCM, TCD, ... do; DDIM does
    not)."""
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters


def retrieve_timesteps(
    scheduler: SchedulerMixin,
    num_inference_steps: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    timesteps: Optional[List[int]] = None,
) -> "tuple[torch.Tensor, int]":
    """Set `scheduler` to its timesteps and return them with their number, as diffusers' pipelines'
    `retrieve_timesteps` does: at the given `timesteps` (descending training timesteps; `num_inference_steps` is
    then their number) where there are some, else at `num_inference_steps` of the scheduler's own choosing. Raises
    ValueError for custom timesteps that the scheduler's `set_timesteps` does not take."""
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    else:
        if not accepts_timesteps(scheduler):
            raise ValueError(
                f"the scheduler {type(scheduler).__name__} does not take custom timesteps in its `set_timesteps`; "
                "give num_inference_steps instead, or use a scheduler that does (DDPM, LCM, ...)"
            )
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    return scheduler.timesteps, len(scheduler.timesteps)


def denoise_frame(
    unet,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    identity_frames: torch.Tensor,
    motion_frames: torch.Tensor,
    audio_context: torch.Tensor,
    num_inference_steps: int,
    timesteps: Optional[List[int]] = None,
    generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
    on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """One frame of every video of a batch, `(batch_size, channels, height, width)` in float32: `noise` (float32, on
    the device) denoised by `scheduler` at `num_inference_steps` steps (at `timesteps`, where given), `unet`
    conditioned on the identity frames, the motion frames and the audio window. The one denoising loop of the
    project: the pipeline, the live session and the distillation's samplers all make their frames here.

    `scheduler` is set to its timesteps afresh (multistep schedulers keep state between steps, so a scheduler is
    one caller's), the noise scaled by its `init_noise_sigma` after that (the scale can follow the timesteps), and
    it is given the model's variance channels only where it uses them (`scheduler_uses_variance`). The sample and
    the scheduler's update stay in float32 whatever the UNet's dtype: in half precision the update's small
    differences of large terms would lose most of their digits. `on_step(step_index, timestep, latents)` is called
    after every step and returns the latents to go on with."""
    parameter = next(unet.parameters())
    dtype, channels = parameter.dtype, noise.shape[1]
    retrieve_timesteps(scheduler, num_inference_steps, noise.device, timesteps)
    uses_variance = scheduler_uses_variance(scheduler)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    identity_frames, motion_frames, audio_context = (
        x.to(dtype) for x in (identity_frames, motion_frames, audio_context)
    )
    latents = noise * scheduler.init_noise_sigma
    for step_index, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t).to(dtype)
        model_output = unet(model_input, t, identity_frames, motion_frames, audio_context).sample.float()
        if not uses_variance:
            model_output = model_output[:, :channels]
        latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            latents = on_step(step_index, t, latents)
    return latents


def _unwrapped(module):
    """A module compiled with `torch.compile` as the module it wraps."""
    return getattr(module, "_orig_mod", module)


MODEL_CARD_TAGS = ("talking-face", "talking-head", "audio-driven", "diffused-heads")
MODEL_CARD_USAGE = """A Diffused Heads pipeline: a talking-face video from one face image and a speech recording.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
video = pipe(face, speech, sampling_rate=16000).frames[0]
```

`face` is a face image (centred on a plain background works best), `speech` a 1-D waveform; the frames are 25 per
second of speech."""


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def preprocess_identity_image(image: ImageInput, size: int) -> torch.Tensor:
    """One identity image to a `(3, size, size)` float tensor in [-1, 1] (stretched to a square, as in training)."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"an identity image array must be HxW or HxWxC with C in 1, 3, 4; got shape {image.shape}"
            )
        if image.dtype == np.uint8:
            array = image.astype(np.float32) / 255.0
        elif np.issubdtype(image.dtype, np.floating):
            array = image.astype(np.float32)
            if array.size and (array.min() < 0.0 or array.max() > 1.0):
                raise ValueError("a float identity image array must hold values in [0, 1]")
        else:
            raise ValueError(f"an identity image array must be uint8 or float in [0, 1], got {image.dtype}")
        array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) * 2.0 - 1.0
    elif torch.is_tensor(image):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"an identity image tensor must be CHW with 3 channels, got shape {tuple(image.shape)}")
        if tensor.numel() and (tensor.min() < -1.0 - 1e-3 or tensor.max() > 1.0 + 1e-3):
            raise ValueError("an identity image tensor must hold values in [-1, 1]")
    else:
        raise TypeError(
            f"identity_image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}"
        )
    if min(tensor.shape[-2:]) < 1:
        raise ValueError(f"the identity image is empty (size {tuple(tensor.shape[-2:])})")
    if not torch.isfinite(tensor).all():
        raise ValueError("the identity image holds NaN or infinite values")
    if tuple(tensor.shape[-2:]) != (size, size):
        antialias = min(tensor.shape[-2:]) > size
        tensor = F.interpolate(
            tensor[None], size=(size, size), mode="bilinear", antialias=antialias, align_corners=False
        )[0]
    return tensor.clamp(-1.0, 1.0)


def preprocess_audio(audio: AudioInput, sampling_rate: float, target_rate: int) -> torch.Tensor:
    """One mono waveform to a float32 tensor at `target_rate`."""
    if isinstance(audio, np.ndarray):
        if not (np.issubdtype(audio.dtype, np.floating) or np.issubdtype(audio.dtype, np.integer)):
            raise ValueError(f"audio must be a numeric array, got dtype {audio.dtype}")
        if np.issubdtype(audio.dtype, np.integer):
            audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
        waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    elif torch.is_tensor(audio):
        waveform = audio.detach().float().cpu()
    else:
        raise TypeError(f"audio must be a numpy array or a torch tensor, got {type(audio).__name__}")
    if waveform.ndim != 1:
        raise ValueError(
            f"audio must be a 1-D mono waveform, got shape {tuple(waveform.shape)}; mix the channels down first "
            "(or pass a list for a batch)"
        )
    if waveform.numel() == 0:
        raise ValueError("audio is empty")
    if not torch.isfinite(waveform).all():
        raise ValueError("audio holds NaN or infinite values")
    return resample_audio(waveform, sampling_rate, target_rate)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import numpy as np
        >>> import PIL.Image
        >>> import soundfile
        >>> import torch
        >>> from diffusers import DDIMScheduler, DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/diffused-heads-crema", trust_remote_code=True)
        >>> pipe = pipe.to("cuda")
        >>> face = PIL.Image.open("face.png")  # a CREMA-style crop: the face centred on green
        >>> speech, rate = soundfile.read("speech.wav", dtype="float32")

        >>> video = pipe(face, speech, sampling_rate=rate, generator=torch.Generator("cuda").manual_seed(0)).frames[0]

        >>> # A faster sampler, for one call, without touching `pipe`:
        >>> fast = type(pipe).from_pipe(
        ...     pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        ... )
        >>> video = fast(face, speech, sampling_rate=rate, num_inference_steps=20).frames[0]

        >>> # Frames one by one as they are made (memory does not grow with the length of the speech):
        >>> for output in pipe.stream(face, speech, sampling_rate=rate):
        ...     frame = output.frames[0]  # (height, width, 3) in [0, 1]
        ```
"""


@dataclass
class DiffusedHeadsFrameOutput(BaseOutput):
    """
    One frame of every video of a batch, as [`DiffusedHeadsPipeline.stream`] yields it.

    Args:
        frame_index (`int`): Which frame this is (0 for the first).
        frames (`np.ndarray`, `torch.Tensor` or `List[PIL.Image.Image]`): The frame of each video, in [0, 1]: for
            `"np"` an array `(batch_size, height, width, 3)`, for `"pt"` a tensor `(batch_size, 3, height, width)`,
            for `"pil"` a list of images. A video whose clip is shorter than `frame_index + 1` frames has a frame
            here that belongs to no video: see `num_frames`.
        num_frames (`List[int]`, *optional*): How many frames each video has; None while streamed speech is still
            arriving.
        audio (`List[np.ndarray]`, *optional*): The 16 kHz mono audio of each video (25 frames per second of it);
            None for streamed speech.
        frame_audio (`List[np.ndarray]`): This frame's own 40 ms of 16 kHz speech in each video (640 samples for
            the released encoder), to play with the frame.
    """

    frame_index: int
    frames: Union[np.ndarray, torch.Tensor, List[PIL.Image.Image]]
    num_frames: Optional[List[int]]
    audio: Optional[List[np.ndarray]]
    frame_audio: Optional[List[np.ndarray]] = None


def is_chunk_stream(audio) -> bool:
    """Whether `audio` is speech that arrives in chunks (an iterator or other iterable of chunks, sync or async)
    rather than whole clips (an array, a tensor, or a list or tuple of them: a batch)."""
    if isinstance(audio, (np.ndarray, torch.Tensor, list, tuple, str, bytes)):
        return False
    return hasattr(audio, "__iter__") or hasattr(audio, "__aiter__")


def chunk_samples(chunk, sampling_rate: float) -> "tuple[torch.Tensor, float]":
    """One chunk of streamed speech as a mono float32 tensor and its sample rate: an array or tensor of samples
    (1-D, or 2-D `(samples, channels)` as soundfile and sounddevice give them, mixed down), or a pair `(samples,
    sampling_rate)` for a chunk that carries its own rate; integer samples are scaled to [-1, 1]."""
    rate = sampling_rate
    if isinstance(chunk, tuple) and len(chunk) == 2 and not isinstance(chunk[1], (np.ndarray, torch.Tensor)):
        chunk, rate = chunk
        if not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"a chunk's sampling rate must be a positive number, got {rate!r}")
    if isinstance(chunk, np.ndarray):
        if np.issubdtype(chunk.dtype, np.integer):
            chunk = chunk.astype(np.float32) / float(np.iinfo(chunk.dtype).max)
        elif not np.issubdtype(chunk.dtype, np.floating):
            raise ValueError(f"an audio chunk must be numeric, got dtype {chunk.dtype}")
        samples = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
    elif torch.is_tensor(chunk):
        samples = chunk.detach().float().cpu()
    else:
        raise TypeError(f"an audio chunk must be a numpy array or a torch tensor, got {type(chunk).__name__}")
    if samples.ndim == 2:
        samples = samples.mean(dim=1)
    if samples.ndim != 1:
        raise ValueError(f"an audio chunk must be 1-D or (samples, channels), got shape {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("an audio chunk holds NaN or infinite values")
    return samples, rate


class _FrameLoop:
    """The state of one call's frame loop: the identity, the two motion frames before the next frame, the sampler
    and its settings. `make` makes the next frame from its audio window."""

    def __init__(
        self,
        pipe,
        identity_frames,
        scheduler,
        num_inference_steps,
        timesteps,
        stabilize_every,
        generator,
        frame_noise,
        callback=None,
        callback_inputs=(),
        progress_bar=None,
    ):
        self.pipe, self.scheduler = pipe, scheduler
        self.identity_frames = identity_frames
        self.motion_channels = pipe.unet.config.motion_frame_channels
        self.identity_motion = to_motion_frame(identity_frames, self.motion_channels)
        self.previous = [self.identity_motion, self.identity_motion]
        self.num_inference_steps, self.timesteps = num_inference_steps, timesteps
        self.stabilize_every, self.generator, self.frame_noise = stabilize_every, generator, frame_noise
        self.callback, self.callback_inputs, self.progress_bar = callback, list(callback_inputs), progress_bar

    def make(self, frame_index: int, audio_context: torch.Tensor) -> torch.Tensor:
        """Frame `frame_index` `(batch_size, 3, S, S)` in [-1, 1] (float32); its motion frames become the next's."""
        if self.stabilize_every and frame_index > 0 and frame_index % self.stabilize_every == 0:
            self.previous[0] = self.identity_motion
        identity_frames, motion_frames = self.identity_frames, torch.cat(self.previous, dim=1)
        pipe = self.pipe

        def on_step(step_index, t, frame_latents):
            if self.callback is not None:
                tensors = dict(
                    frame_latents=frame_latents,
                    identity_frames=identity_frames,
                    motion_frames=motion_frames,
                    audio_context=audio_context,
                )
                global_step = frame_index * pipe._num_timesteps + step_index
                outputs = self.callback(pipe, global_step, t, {k: tensors[k] for k in self.callback_inputs}) or {}
                frame_latents = outputs.pop("frame_latents", frame_latents)
            if self.progress_bar is not None:
                self.progress_bar.update()
            return frame_latents

        frame_latents = denoise_frame(
            pipe.unet,
            self.scheduler,
            self.frame_noise(frame_index),
            identity_frames,
            motion_frames,
            audio_context,
            self.num_inference_steps,
            self.timesteps,
            self.generator,
            on_step,
        )
        self.previous = [
            self.previous[1],
            to_motion_frame(frame_latents.to(identity_frames.dtype), self.motion_channels),
        ]
        return frame_latents


def lookahead_samples(unet, audio_encoder) -> int:
    """How much speech after a frame's start the frame needs, in samples of the encoder's rate: the end of its own
    window (window length less the padding: 1,920 samples, 120 ms, for the released encoder) and the windows of the
    frames after it in the UNet's audio context (2 hops, 80 ms): 3,200 samples, 200 ms."""
    window_end = audio_encoder.config.window_length - audio_encoder.padding
    return window_end + (unet.config.audio_context // 2) * audio_encoder.config.hop_length


def audio_context_of(embeddings: Dict[int, torch.Tensor], frame_index: int, context: int, last: int) -> torch.Tensor:
    """The `(1, context, dim)` audio window of frame `frame_index` from embeddings kept by window index, clamped to
    windows 0 to `last` (as `audio_window` clamps at a clip's ends)."""
    offsets = range(frame_index - context // 2, frame_index + context // 2 + 1)
    return torch.stack([embeddings[min(max(k, 0), last)] for k in offsets])[None]


class SpeechToFrames:
    """Frames of one video made as its speech arrives: `push` a chunk and get the frames whose audio window it
    completes, `end` the speech and get the rest. What `DiffusedHeadsPipeline.stream` runs for speech in chunks,
    and the live session under it.

    A frame needs the speech up to the end of the last window in its audio context: with the released encoder
    (0.2-s windows, hop 40 ms) and the UNet's 5-frame context, 200 ms after the frame's start (`lookahead_samples`),
    and nothing later; everything before is known. The encoder's state is carried between chunks, and only the
    embeddings of the frames still to be made are kept, so time and memory per frame do not grow with the length.
    The frames equal those of the whole-speech call with the same noise."""

    def __init__(self, pipe, loop: _FrameLoop, sampling_rate: float, output_type: str = "np"):
        from importlib import import_module

        encoder_module = import_module(type(pipe.audio_encoder).__module__)
        self.pipe, self.loop, self.output_type = pipe, loop, output_type
        self.default_rate, self.sampling_rate = sampling_rate, None  # the first chunk's rate is the stream's
        self.target_rate = pipe.audio_encoder.config.sampling_rate
        self.resampler = None
        self.speech = encoder_module.AudioEmbeddingStream(pipe.audio_encoder, device=loop.identity_frames.device)
        self.embeddings: Dict[int, torch.Tensor] = {}  # window index -> embedding, while a frame needs it
        self.samples = torch.zeros(0)  # the 16 kHz speech from frame `frame_index`'s start on
        self.frame_index = 0
        self.context = pipe.unet.config.audio_context
        self.hop = pipe.audio_encoder.config.hop_length

    @property
    def lookahead_samples(self) -> int:
        """How much speech after a frame's start it needs, in samples of the encoder's rate."""
        return lookahead_samples(self.pipe.unet, self.pipe.audio_encoder)

    def push(self, chunk) -> Iterator[DiffusedHeadsFrameOutput]:
        """Take one chunk of speech (see `chunk_samples`); yield the frames it completes, each as it is made."""
        samples, rate = chunk_samples(chunk, self.default_rate)
        if self.sampling_rate is None:
            self.sampling_rate, self.resampler = rate, StreamingResampler(rate, self.target_rate)
        if rate != self.sampling_rate:
            raise ValueError(
                f"the audio stream's sampling rate changed from {self.sampling_rate:g} to {rate:g} Hz; a stream "
                "keeps one rate (start a new stream for the other)"
            )
        return self.push_samples(self.resampler.push(samples))

    def push_samples(self, samples: torch.Tensor) -> Iterator[DiffusedHeadsFrameOutput]:
        """`push` for speech already at the encoder's rate (16 kHz)."""
        self.samples = torch.cat([self.samples, samples])
        self._add_embeddings(self.speech.push(samples))
        return self._frames()

    def end(self) -> Iterator[DiffusedHeadsFrameOutput]:
        """The end of the speech: yield the last frames (their audio windows clamped at the end, as in the whole
        call)."""
        tail = self.resampler.end() if self.resampler is not None else torch.zeros(0)
        self.samples = torch.cat([self.samples, tail])
        self._add_embeddings(self.speech.push(tail))
        self._add_embeddings(self.speech.end())
        if self.speech.num_frames < 1:
            seconds = self.speech.received / self.target_rate
            raise ValueError(f"audio is too short ({seconds * 1000:.1f} ms) to make one video frame")
        return self._frames()

    def _add_embeddings(self, new: torch.Tensor) -> None:
        first = self.speech.windows - len(new)
        for k in range(len(new)):
            self.embeddings[first + k] = new[k]

    def ready(self) -> bool:
        """Whether the next frame's audio window is complete."""
        total = self.speech.num_frames
        if total is not None:
            return self.frame_index < total
        return self.frame_index + self.context // 2 < self.speech.windows

    def _frames(self) -> Iterator[DiffusedHeadsFrameOutput]:
        while self.ready():
            yield self.make_next()

    def make_next(self) -> DiffusedHeadsFrameOutput:
        index, total = self.frame_index, self.speech.num_frames
        last = (total if total is not None else self.speech.windows) - 1
        audio_context = audio_context_of(self.embeddings, index, self.context, last)
        latents = self.loop.make(index, audio_context.to(self.loop.identity_frames.dtype))
        frame_audio = F.pad(self.samples[: self.hop], (0, max(0, self.hop - len(self.samples))))
        self.samples = self.samples[self.hop :]
        self.frame_index += 1
        for k in [k for k in self.embeddings if k < self.frame_index - self.context // 2]:
            del self.embeddings[k]
        return DiffusedHeadsFrameOutput(
            frame_index=index,
            frames=self.pipe.postprocess(latents, self.output_type),
            num_frames=None if total is None else [total],
            audio=None,
            frame_audio=[frame_audio.numpy()],
        )


class DiffusedHeadsPipeline(DiffusionPipeline):
    r"""
    Pipeline for talking-face generation with Diffused Heads (Stypułkowski et al., WACV 2024).

    Frames are made one after another: each is denoised from fresh noise, conditioned on the identity frame,
    the two previously generated frames and the audio embeddings of the five frames around it.

    Args:
        unet ([`DiffusedHeadsUNetModel`]): The denoising UNet.
        audio_encoder ([`DiffusedHeadsAudioEncoder`]): Turns 16 kHz speech into one embedding per frame.
        scheduler ([`SchedulerMixin`]): [`DDPMScheduler`] with the learned-range variance reproduces the
            original sampler; any other diffusers scheduler can be used (it is then given the first three output
            channels only: the noise, or v for a model trained with v-prediction).
        trained_clip_seconds (`float`, *optional*): The longest clip the model is known to handle (about 9 s for
            the released model, the length of its training clips for a model trained here); longer audio without
            `stabilize_every` gets a warning.
        stabilize_every (`int`, *optional*): The model's own default for the call's `stabilize_every` (None: the
            identity frame is not put back).
        num_inference_steps (`int`, *optional*): The model's own default for the call's `num_inference_steps`
            (None: 100, the released sampler's).
        timesteps (`List[int]`, *optional*): The model's own timesteps (descending), used whenever a call makes
            that many steps with a scheduler that takes custom timesteps; a distilled student keeps the timesteps
            it was trained at here.
    """

    model_cpu_offload_seq = "audio_encoder->unet"
    _callback_tensor_inputs = ["frame_latents", "identity_frames", "motion_frames", "audio_context"]

    def __init__(
        self,
        unet,
        audio_encoder,
        scheduler: Union[SchedulerMixin, KarrasDiffusionSchedulers],
        trained_clip_seconds: Optional[float] = None,
        stabilize_every: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, audio_encoder=audio_encoder, scheduler=scheduler)
        self.register_to_config(
            trained_clip_seconds=trained_clip_seconds,
            stabilize_every=stabilize_every,
            num_inference_steps=num_inference_steps,
            timesteps=None if timesteps is None else [int(t) for t in timesteps],
        )

    # --- loading and saving: a folder that loads with this package's classes or, standing alone, as remote code ---

    # The model_index.json files that the hook below read during the `from_pretrained` call running in this context
    # (thread or task), to tell whether diffusers still reads them through it; None outside such a call.
    _index_reads: contextvars.ContextVar = contextvars.ContextVar("diffused_heads_index_reads", default=None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """[`DiffusionPipeline.from_pretrained`]; through the installed package, the folder's code files are read
        as the package's modules (see `_dict_from_json_file`), and a diffusers that no longer reads
        `model_index.json` that way is said in one message instead of a request for remote code."""
        reads = []

        def hook_unused() -> bool:
            return bool(_package_modules()) and not reads

        def unused_hook_error() -> RuntimeError:
            import diffusers

            return RuntimeError(
                f"diffusers {diffusers.__version__} no longer reads model_index.json through "
                "DiffusionPipeline._dict_from_json_file, which the diffused_heads package uses to load model folders "
                "with its own classes: install a diffusers release that the package allows (pyproject.toml), or "
                "load the folder as remote code with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
            )

        token = DiffusedHeadsPipeline._index_reads.set(reads)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ValueError as error:
            if hook_unused() and "trust_remote_code" in str(error):
                raise unused_hook_error() from error
            raise
        finally:
            DiffusedHeadsPipeline._index_reads.reset(token)
        if hook_unused():  # (some releases would then run the folder's code as remote code, unasked)
            raise unused_hook_error()
        return pipe

    @classmethod
    def _dict_from_json_file(cls, json_file: Union[str, os.PathLike], *args, **kwargs):
        """Read `model_index.json`; imported from the `diffused_heads` package, name the package's modules.

        A saved folder names its code files (`["unet_diffused_heads", "DiffusedHeadsUNetModel"]`), which
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` loads from beside the weights. Loaded
        through the installed package, the same entries are read as the package's modules, so diffusers' own
        `from_pretrained` builds the package's classes with every loading option it has, and no remote code runs."""
        config = super()._dict_from_json_file(json_file, *args, **kwargs)  # (diffusers 0.35: `dduf_entries`)
        modules = _package_modules()
        if not modules or "_class_name" not in config:
            return config
        reads = DiffusedHeadsPipeline._index_reads.get()
        if reads is not None:
            reads.append(json_file)
        pipeline_stem = os.path.splitext(os.path.basename(inspect.getsourcefile(cls)))[0]
        if list(_as_list(config["_class_name"])) == [pipeline_stem, cls.__name__]:
            config["_class_name"] = cls.__name__
        for name, value in config.items():
            if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] in modules:
                config[name] = [modules[value[0]], value[1]]
        return config

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """A new pipeline sharing `pipeline`'s components and config, with the ones passed replaced: for example
        another scheduler for some calls, without changing `pipeline`.

        Unless a `torch_dtype` is asked for, the shared modules keep their dtypes: `DiffusionPipeline.from_pipe`
        casts them to float32 by default, which would change `pipeline` itself (a bfloat16 UNet runs beside a
        float32 audio encoder here)."""
        if "torch_dtype" in kwargs or "dtype" in kwargs:
            for name in ("unet", "audio_encoder"):
                kwargs.setdefault(name, getattr(pipeline, name))
            return super().from_pipe(pipeline, **kwargs)
        parts = {name: kwargs.pop(name, getattr(pipeline, name)) for name in ("unet", "audio_encoder", "scheduler")}
        options = {name: kwargs.pop(name, pipeline.config.get(name)) for name in cls._optional_config()}
        if kwargs:
            raise TypeError(f"from_pipe got unexpected keyword arguments {sorted(kwargs)}")
        derived = cls(**parts, **options)
        if pipeline.config.get("_name_or_path"):
            derived.register_to_config(_name_or_path=pipeline.config["_name_or_path"])
        return derived

    @classmethod
    def _optional_config(cls) -> List[str]:
        """The config entries `__init__` takes besides the components."""
        return [
            name
            for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", "unet", "audio_encoder", "scheduler")
        ]

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            self._name_code_file(name, module)

    def __setattr__(self, name, value):
        # `pipe.unet = torch.compile(pipe.unet)` (diffusers' documented way; `pipe.unet.compile()` compiles in place
        # and needs none of this) registers the component through diffusers' `__setattr__`, which names the class
        # by its package module; the saved folder must name the code file saved beside it.
        super().__setattr__(name, value)
        if name in ("unet", "audio_encoder") and hasattr(self, "_internal_dict"):
            self._name_code_file(name, value)

    def _name_code_file(self, name: str, module) -> None:
        module = _unwrapped(module)
        if module is not None and self._is_custom(module):
            file_stem = os.path.splitext(os.path.basename(inspect.getsourcefile(type(module))))[0]
            self.register_to_config(**{name: (file_stem, type(module).__name__)})

    @staticmethod
    def _is_custom(module) -> bool:
        return type(_unwrapped(module)).__module__.split(".")[0] not in ("diffusers", "transformers", "torch")

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs):
        """Save the pipeline with its code: `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` loads it.

        Takes the arguments of [`DiffusionPipeline.save_pretrained`]. With `push_to_hub=True` (and optionally
        `repo_id`, `token`, `private`, `commit_message`, `create_pr`, `subfolder`) the folder, code and model card
        included, is then uploaded by diffusers' own upload. `model_card=` writes the given text as the folder's
        `README.md`; a folder pushed without one gets the Hub repository's card, or a new one, through diffusers'
        `load_or_create_model_card` and `populate_model_card`, as diffusers' own `push_to_hub` does.
        """
        card = kwargs.pop("model_card", None)
        hub_kwargs = {
            k: kwargs.pop(k)
            for k in ("repo_id", "token", "private", "commit_message", "create_pr", "subfolder")
            if k in kwargs
        }
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        self._write_code(save_directory)
        readme = os.path.join(save_directory, "README.md")
        if card is not None:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(card)
        if push_to_hub:
            from huggingface_hub import create_repo

            token = hub_kwargs.get("token")
            repo_id = hub_kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = create_repo(repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=token).repo_id
            subfolder = hub_kwargs.get("subfolder")
            if not subfolder and not os.path.exists(readme):
                self._hub_model_card(repo_id, token).save(readme)
            self._upload_folder(
                save_directory,
                repo_id,
                token=token,
                commit_message=hub_kwargs.get("commit_message"),
                create_pr=hub_kwargs.get("create_pr", False),
                subfolder=subfolder,
            )

    @staticmethod
    def _hub_model_card(repo_id: str, token: Optional[str] = None):
        """The card of the Hub repository `repo_id`, or a new one saying how to load this pipeline; tagged."""
        from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

        description = MODEL_CARD_USAGE.replace("{repo_id}", repo_id)
        card = load_or_create_model_card(repo_id, token=token, is_pipeline=True, model_description=description)
        card = populate_model_card(card, tags=[tag for tag in MODEL_CARD_TAGS if tag not in (card.data.tags or [])])
        card.data.pipeline_tag = card.data.pipeline_tag or "image-to-video"
        card.data.license = card.data.license or "other"
        return card

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        subfolder: Optional[str] = None,
        model_card: Optional[str] = None,
    ) -> str:
        """Upload the pipeline with its code to the Hub repository `repo_id` (created if needed), as
        `save_pretrained(..., push_to_hub=True)` does (the arguments of diffusers' `push_to_hub`). The model card
        is `model_card`, else the card of the folder the pipeline was loaded from, else the repository's own or a
        new one (diffusers' `load_or_create_model_card`)."""
        import tempfile

        if model_card is None:
            source = self.config.get("_name_or_path")
            local = isinstance(source, (str, os.PathLike)) and os.path.isdir(source)
            readme = os.path.join(source, "README.md") if local else None
            if readme and os.path.isfile(readme):
                with open(readme, encoding="utf-8") as f:
                    model_card = f.read()
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder,
                push_to_hub=True,
                repo_id=repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                create_pr=create_pr,
                safe_serialization=safe_serialization,
                variant=variant,
                subfolder=subfolder,
                model_card=model_card,
            )
        return repo_id

    def _write_code(self, save_directory) -> None:
        pipeline_file = inspect.getsourcefile(type(self))
        shutil.copyfile(pipeline_file, os.path.join(save_directory, os.path.basename(pipeline_file)))
        for name in ("unet", "audio_encoder"):
            module = _unwrapped(getattr(self, name))
            if module is not None and self._is_custom(module):
                source = inspect.getsourcefile(type(module))
                shutil.copyfile(source, os.path.join(save_directory, name, os.path.basename(source)))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [os.path.splitext(os.path.basename(pipeline_file))[0], type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    # --- properties of the call in progress ---

    @property
    def num_timesteps(self) -> int:
        """Denoising steps per frame of the call in progress (or the last one)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (from a callback) to stop after the frame being made: the output then holds
        the frames finished so far."""
        return self._interrupt

    # --- inputs ---

    def resolve_timesteps(self, num_inference_steps=None, timesteps=None):
        """The steps a call makes and its custom timesteps (None: the scheduler's own choice): the call's, else the
        model's own (`config.timesteps`) where they are as many as the steps and the scheduler takes them."""
        if timesteps is not None:
            try:
                timesteps = [int(t) for t in timesteps]
            except (TypeError, ValueError):
                raise ValueError(f"timesteps must be a list of integers, got {timesteps!r}") from None
            train = self.scheduler.config.get("num_train_timesteps", 1000)
            if not timesteps or any(not 0 <= t < train for t in timesteps):
                raise ValueError(
                    f"timesteps must be a non-empty list of training timesteps in [0, {train}), got {timesteps}"
                )
            if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"timesteps must be in descending order, got {timesteps}")
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(
                    f"num_inference_steps {num_inference_steps} differs from the {len(timesteps)} timesteps"
                )
            if not accepts_timesteps(self.scheduler):
                raise ValueError(f"{type(self.scheduler).__name__} does not take custom timesteps")
            return len(timesteps), timesteps
        if num_inference_steps is None:
            num_inference_steps = self.config.get("num_inference_steps") or DEFAULT_NUM_INFERENCE_STEPS
        own = self.config.get("timesteps")
        if own and len(own) == num_inference_steps and accepts_timesteps(self.scheduler):
            return num_inference_steps, list(own)
        return num_inference_steps, None

    def check_inputs(
        self,
        num_inference_steps,
        stabilize_every,
        output_type,
        sampling_rate,
        callback_on_step_end_tensor_inputs,
        num_videos_per_prompt=1,
    ):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be a positive integer, got {num_videos_per_prompt!r}")
        if stabilize_every is not None and (not isinstance(stabilize_every, int) or stabilize_every < 0):
            raise ValueError(f"stabilize_every must be None, 0 (off) or a positive integer, got {stabilize_every!r}")
        check_output_type(output_type)
        if not isinstance(sampling_rate, (int, float)) or not sampling_rate > 0:
            raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not in {self._callback_tensor_inputs}")
        if self.unet.config.audio_embedding_dim != self.audio_encoder.config.hidden_size:
            raise ValueError(
                f"the UNet expects audio embeddings of size {self.unet.config.audio_embedding_dim}, the audio "
                f"encoder makes {self.audio_encoder.config.hidden_size}"
            )

    def prepare_inputs(self, identity_image, audio, sampling_rate, num_videos_per_prompt: int = 1):
        """Identity frames `(B, 3, S, S)` in [-1, 1], 16 kHz waveforms `(B, N)` zero-padded to the longest, and
        each waveform's own length, with batch broadcasting; each pair repeated `num_videos_per_prompt` times (its
        samples side by side)."""
        size = self.unet.config.sample_size
        identities = [preprocess_identity_image(image, size) for image in _as_list(identity_image)]
        target_rate = self.audio_encoder.config.sampling_rate
        waveforms = [preprocess_audio(clip, sampling_rate, target_rate) for clip in _as_list(audio)]
        if not identities or not waveforms:
            raise ValueError("identity_image and audio must not be empty lists")
        for index, waveform in enumerate(waveforms):
            if self.audio_encoder.num_frames(waveform.shape[-1]) < 1:
                seconds = waveform.shape[-1] / target_rate
                which = f"audio clip {index} " if len(waveforms) > 1 else "audio "
                raise ValueError(f"{which}is too short ({seconds * 1000:.1f} ms) to make one video frame")
        batch = max(len(identities), len(waveforms))
        for name, items in (("identity_image", identities), ("audio", waveforms)):
            if len(items) not in (1, batch):
                raise ValueError(
                    f"got {len(identities)} identity images and {len(waveforms)} audio clips; give equal numbers "
                    f"or one of either ({name} does not fit)"
                )
        repeat = num_videos_per_prompt
        identities = torch.stack(identities * (batch // len(identities))).repeat_interleave(repeat, dim=0)
        waveforms = [w for w in waveforms * (batch // len(waveforms)) for _ in range(repeat)]
        lengths = [w.shape[-1] for w in waveforms]
        # Zeros after a clip change none of its windows (the encoder pads with zeros) nor, the GRU being causal,
        # its embeddings; each clip's audio window is clamped at its own end in the loop.
        if len(waveforms) == 1:
            return identities, waveforms[0][None], lengths
        waveforms = torch.stack([F.pad(w, (0, max(lengths) - w.shape[-1])) for w in waveforms])
        return identities, waveforms, lengths

    def encode_audio(self, waveforms: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One audio embedding per video frame, `(batch_size, num_frames, hidden_size)`, in `dtype` on `device`."""
        encoder_dtype = self.audio_encoder.dtype
        embeddings = self.audio_encoder(waveforms.to(device=device, dtype=encoder_dtype)).audio_embeddings
        return embeddings.to(dtype)

    def prepare_latents(
        self,
        shape: tuple,
        device: torch.device,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]],
        latents: Optional[torch.Tensor] = None,
    ) -> Callable[[int], torch.Tensor]:
        """The initial noise of each frame, as a function of the frame index that gives `shape = (batch_size,
        channels, height, width)` in float32.

        Taken from `latents` `(batch_size, num_frames, channels, height, width)` when given. Else drawn when the
        frame is made, from `generator` (a list: each video's from its own), right before the scheduler's own noise
        of that frame: so no more than one frame of noise is held, a video's noise does not depend on how long it
        is, and speech that is still arriving gets the frames the whole speech gets with the same generator."""
        if latents is not None:

            def given(frame_index: int) -> torch.Tensor:
                if frame_index >= latents.shape[1]:
                    raise ValueError(f"latents hold {latents.shape[1]} frames; frame {frame_index} needs noise too")
                return latents[:, frame_index].to(device=device, dtype=torch.float32)

            return given
        return lambda frame_index: randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def postprocess(self, frames: torch.Tensor, output_type: str):
        """Frames `(..., 3, H, W)` in [-1, 1] (one frame of a batch, or whole videos) in [0, 1] as `output_type`:
        `"pt"` keeps the layout, `"np"` puts the channels last, `"pil"` makes (lists of) images; `"latent"` gives
        the denoised frames as they are (float32 in about [-1, 1], unclipped, on the pipeline's device)."""
        if output_type == "latent":
            return frames.float()
        return self._as_output_type(((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu(), output_type)

    @staticmethod
    def _as_output_type(frames: torch.Tensor, output_type: str):
        """Frames `(..., 3, H, W)` already in [0, 1] as `output_type`."""
        if output_type == "pt":
            return frames
        array = frames.movedim(-3, -1).numpy()
        if output_type == "np":
            return array

        def to_pil(item):
            if item.ndim == 3:
                return PIL.Image.fromarray((item * 255.0).round().astype(np.uint8))
            return [to_pil(inner) for inner in item]

        return to_pil(array)

    def _warn_on_mismatched_spacing(self):
        """DDIM steps from t to t - num_train_timesteps // num_inference_steps, which is not the next timestep
        when they are spaced with "linspace" (the DDPM default, so what `from_config` gives it): every step then
        lands on a noise level other than the one the next step assumes, and the last frame keeps visible noise."""
        from diffusers import DDIMParallelScheduler, DDIMScheduler

        if (
            isinstance(self.scheduler, (DDIMScheduler, DDIMParallelScheduler))
            and self.scheduler.config.get("timestep_spacing") == "linspace"
        ):
            logger.warning(
                f"{type(self.scheduler).__name__} with timestep_spacing='linspace' does not step to its own next "
                "timestep and leaves noise in the frames; make it with "
                f"{type(self.scheduler).__name__}.from_config(pipe.scheduler.config, timestep_spacing='trailing')."
            )

    # --- generation ---

    @torch.no_grad()
    def stream(
        self,
        identity_image: Union[ImageInput, List[ImageInput]],
        audio: Union[AudioInput, List[AudioInput], Iterable],
        sampling_rate: int = 16000,
        num_inference_steps: Optional[int] = None,
        stabilize_every: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "np",
        callback_on_step_end: Optional[Callable[["DiffusedHeadsPipeline", int, int, Dict[str, Any]], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["frame_latents"],
        num_videos_per_prompt: int = 1,
    ) -> Iterator[DiffusedHeadsFrameOutput]:
        r"""
        Generate talking-face videos frame by frame: yields each frame of every video of the batch as soon as it is
        made, as a [`DiffusedHeadsFrameOutput`].

        Takes the arguments of `__call__` (less `return_dict`) and makes the same frames. Only the frame being made
        and the two before it are held, so memory does not grow with the length of the speech: write each frame
        away as it comes. Leaving the loop stops the generation.

        `audio` may also be speech that has not all arrived: an iterator (or other iterable that is not a list) of
        chunks of any size, each an array or tensor of samples at `sampling_rate` (1-D, or `(samples, channels)`,
        mixed down) or a pair `(samples, rate)`. Each frame is yielded as soon as the speech it needs is in (200 ms
        after its start for the released model; see [`SpeechToFrames`]), the last ones when the iterator ends; with
        the same generator the frames are those of the whole speech. One video at a time. For an async iterable
        use [`~DiffusedHeadsPipeline.astream`].
        """
        if hasattr(audio, "__aiter__") and not hasattr(audio, "__iter__"):
            raise TypeError("audio is an async iterable: use `pipe.astream(...)` (an async generator) for it")
        num_inference_steps, timesteps = self.resolve_timesteps(num_inference_steps, timesteps)
        self.check_inputs(
            num_inference_steps,
            stabilize_every,
            output_type,
            sampling_rate,
            callback_on_step_end_tensor_inputs,
            num_videos_per_prompt,
        )
        if stabilize_every is None:
            stabilize_every = self.config.get("stabilize_every")
        self._interrupt = False
        device = self._execution_device
        dtype = self.unet.dtype
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        self._warn_on_mismatched_spacing()
        _, self._num_timesteps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps)

        def frame_loop(identity_frames, progress_bar):
            batch_size = len(identity_frames)
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(
                    f"got {len(generator)} generators for a batch of {batch_size} videos; give one per video"
                )
            if latents is not None and (latents.ndim != 5 or tuple(latents.shape[2:]) != (channels, size, size)):
                raise ValueError(
                    f"latents must have shape (batch_size, num_frames, {channels}, {size}, {size}), got "
                    f"{tuple(latents.shape)}"
                )
            frame_noise = self.prepare_latents((batch_size, channels, size, size), device, generator, latents)
            return _FrameLoop(
                self,
                identity_frames,
                self.scheduler,
                num_inference_steps,
                timesteps,
                stabilize_every,
                generator,
                frame_noise,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
                progress_bar,
            )

        # The hooks are freed however the loop ends: also when a consumer stops early (closes the generator).
        try:
            if is_chunk_stream(audio):
                if num_videos_per_prompt != 1 or len(_as_list(identity_image)) != 1:
                    raise ValueError("speech in chunks makes one video: give one identity image")
                identity_frames = preprocess_identity_image(_as_list(identity_image)[0], size)[None]
                with self.progress_bar(iterable=iter(())) as progress_bar:  # (no total: the length is not known)
                    loop = frame_loop(identity_frames.to(device=device, dtype=dtype), progress_bar)
                    frames = SpeechToFrames(self, loop, sampling_rate, output_type)
                    for chunk in audio:
                        for output in frames.push(chunk):
                            yield output
                            if self.interrupt:
                                return
                    yield from frames.end()
                return

            # 1. Inputs: identity frames in [-1, 1] and one audio embedding per video frame.
            identity_frames, waveforms, lengths = self.prepare_inputs(
                identity_image, audio, sampling_rate, num_videos_per_prompt
            )
            identity_frames = identity_frames.to(device=device, dtype=dtype)
            audio_embeddings = self.encode_audio(waveforms, device, dtype)
            num_frames = audio_embeddings.shape[1]
            frame_counts = [self.audio_encoder.num_frames(n) for n in lengths]
            audio_out = [waveform[:length].numpy() for waveform, length in zip(waveforms, lengths)]
            longest = self.config.get("trained_clip_seconds")
            seconds = waveforms.shape[-1] / self.audio_encoder.config.sampling_rate
            if longest and seconds > longest and not stabilize_every:
                logger.warning(
                    f"the audio is {seconds:.1f} s long; this model was trained on clips up to about {longest:g} s "
                    "and may drift on longer ones: pass stabilize_every (e.g. 15) to put the identity frame back "
                    "regularly"
                )
            hop = self.audio_encoder.config.hop_length
            counts = torch.tensor(frame_counts)
            context = self.unet.config.audio_context

            # 2. Frame by frame: each denoised from fresh noise, conditioned on the identity frame, the two frames
            # before it and the audio around it.
            with self.progress_bar(total=num_frames * self._num_timesteps) as progress_bar:
                loop = frame_loop(identity_frames, progress_bar)
                for frame_index in range(num_frames):
                    audio_context = audio_window(audio_embeddings, frame_index, context, counts)
                    frame_latents = loop.make(frame_index, audio_context)
                    own_audio = [
                        np.pad(clip[frame_index * hop : (frame_index + 1) * hop], (0, hop))[:hop] for clip in audio_out
                    ]
                    yield DiffusedHeadsFrameOutput(
                        frame_index=frame_index,
                        frames=self.postprocess(frame_latents, output_type),
                        num_frames=frame_counts,
                        audio=audio_out,
                        frame_audio=own_audio,
                    )
                    if self.interrupt:
                        break
        finally:
            self.maybe_free_model_hooks()

    async def astream(self, identity_image: ImageInput, audio, **kwargs):
        r"""
        [`~DiffusedHeadsPipeline.stream`] for speech from an async iterable of chunks (a voice agent's text to
        speech, a socket): an async generator of the frames. The chunks are read in the caller's event loop and the
        frames made in a worker thread, so the loop is never blocked by the UNet. Takes `stream`'s arguments.
        """
        import asyncio
        import queue

        chunks: "queue.Queue" = queue.Queue()
        end = object()

        def received():
            while True:
                item = chunks.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        async def feed():
            try:
                if hasattr(audio, "__aiter__"):
                    async for chunk in audio:
                        chunks.put(chunk)
                else:
                    for chunk in audio:
                        chunks.put(chunk)
                chunks.put(end)
            except BaseException as error:  # handed to the frame loop, which raises it
                chunks.put(error)
                if isinstance(error, asyncio.CancelledError):
                    raise

        frames = self.stream(identity_image, received(), **kwargs)
        feeder = asyncio.ensure_future(feed())
        finished = object()
        try:
            while True:
                output = await asyncio.to_thread(next, frames, finished)
                if output is finished:
                    break
                yield output
        finally:
            feeder.cancel()
            chunks.put(end)
            frames.close()

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        identity_image: Union[ImageInput, List[ImageInput]],
        audio: Union[AudioInput, List[AudioInput]],
        sampling_rate: int = 16000,
        num_inference_steps: Optional[int] = None,
        stabilize_every: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["DiffusedHeadsPipeline", int, int, Dict[str, Any]], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["frame_latents"],
        num_videos_per_prompt: int = 1,
    ) -> Union[DiffusedHeadsPipelineOutput, tuple]:
        r"""
        Generate talking-face videos.

        Args:
            identity_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The face to animate: a PIL image, an HxWxC uint8 array, or a CHW tensor in [-1, 1]. It is resized
                (stretched) to the UNet's `sample_size`. A list makes a batch.
            audio (`np.ndarray`, `torch.Tensor` or a list of them):
                Mono speech, 1-D, at `sampling_rate`. A list of clips makes a batch; a single identity or a single
                clip is shared by the whole batch. Clips of different lengths are run together (the shorter ones
                padded, each clamped at its own end) and each video keeps its own length: `num_frames` and
                `num_samples` of the output say it (the arrays are the longest video's length).
            sampling_rate (`int`, defaults to 16000): Sample rate of `audio`; resampled to 16 kHz if different.
            num_inference_steps (`int`, *optional*): Denoising steps per frame; defaults to the model's own
                (`pipe.config.num_inference_steps`), else 100.
            timesteps (`List[int]`, *optional*): Custom timesteps, descending (e.g. `[999, 199]`), for a scheduler
                whose `set_timesteps` takes them; `num_inference_steps` is then their number. Defaults to the
                model's own (`pipe.config.timesteps`) where the call makes as many steps as those.
            stabilize_every (`int`, *optional*): Every this many frames, replace the older motion frame with the
                identity frame, which limits drift on long clips (15 in the authors' training configuration); 0
                turns it off. Defaults to the model's own setting (`pipe.config.stabilize_every`), if any.
            generator (`torch.Generator` or a list of them, *optional*): Makes generation deterministic; a list
                gives each video its own, so that a video does not depend on the rest of its batch.
            latents (`torch.Tensor`, *optional*): Initial noise `(batch_size, num_frames, 3, height, width)`, one
                image per frame (`num_frames` of the longest clip); drawn with `generator`, frame by frame, if not
                given.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"` or `"pil"`; `"latent"` gives the denoised
                frames as they are, `(batch_size, num_frames, 3, height, width)` float32 in about [-1, 1] (this
                model denoises pixels: its latents are the frames), unclipped, on the pipeline's device.
            return_dict (`bool`, defaults to `True`): Return a [`DiffusedHeadsPipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after every denoising step as
                `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, with `step` counted over all frames
                (`step // pipe.num_timesteps` is the frame); may return a dict with a replacement `frame_latents`.
                Setting `pipe._interrupt = True` in it stops after the current frame.
            callback_on_step_end_tensor_inputs (`List[str]`): The tensors passed in `callback_kwargs`, from
                `pipe._callback_tensor_inputs`: `frame_latents` (the frame being denoised, `(batch_size, 3, height,
                width)`), `identity_frames`, `motion_frames` and `audio_context`.
            num_videos_per_prompt (`int`, defaults to 1): Videos made of each identity and clip: the batch holds
                them side by side (video `i * num_videos_per_prompt + j` is sample `j` of pair `i`), and a list of
                generators gives one to each video: sample `j` then has the noise it would have made alone with its
                generator, and differs from it only as batches do (in the last float bits; the repository's
                docs/batch.md).

        Examples:

        Returns:
            [`DiffusedHeadsPipelineOutput`] or `tuple`: the frames, and the 16 kHz audio they match.
        """
        check_output_type(output_type)  # before the work: the frames are made as "pt" and converted at the end
        latent = output_type == "latent"
        frames, frame_counts, audio_out = [], None, None
        for output in self.stream(
            identity_image,
            audio,
            sampling_rate=sampling_rate,
            num_inference_steps=num_inference_steps,
            stabilize_every=stabilize_every,
            timesteps=timesteps,
            generator=generator,
            latents=latents,
            output_type="latent" if latent else "pt",
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            num_videos_per_prompt=num_videos_per_prompt,
        ):
            frames.append(output.frames)
            frame_counts, audio_out = output.num_frames, output.audio
        # (batch_size, num_frames, 3, height, width) in [0, 1] (in [-1, 1] as latents), as the output type asks;
        # one type whatever the lengths: frames after a shorter video's end are black, audio after a shorter
        # clip's end silent.
        video = torch.stack(frames, dim=1)
        frame_counts = [min(count, len(frames)) for count in frame_counts]
        for k, count in enumerate(frame_counts):
            video[k, count:] = -1.0 if latent else 0.0
        if not latent:
            video = self._as_output_type(video, output_type)
        if output_type == "pil":
            video = [images[:count] for images, count in zip(video, frame_counts)]
        num_samples = [len(clip) for clip in audio_out]
        audio_out = np.stack([np.pad(clip, (0, max(num_samples) - len(clip))) for clip in audio_out])
        if not return_dict:
            return (video, audio_out)
        return DiffusedHeadsPipelineOutput(
            frames=video, audio=audio_out, num_frames=frame_counts, num_samples=num_samples
        )
