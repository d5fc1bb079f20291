# Copyright 2026 The Diffused Heads diffusers port authors.
# Licensed under the Apache License, Version 2.0.
"""Diffused Heads (WACV 2024): a talking-face video from one identity frame and a speech recording."""

import inspect
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging
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
            list of images per video. For clips of different lengths, a list with one array (or tensor) per video.
        audio (`np.ndarray`): The 16 kHz mono audio the videos were made from, `(batch_size, num_samples)`,
            25 frames per second of it (a list of 1-D arrays for clips of different lengths).
    """

    frames: Union[np.ndarray, torch.Tensor, List[np.ndarray], List[torch.Tensor], List[List[PIL.Image.Image]]]
    audio: Union[np.ndarray, List[np.ndarray]]


def resample_audio(
    waveform: torch.Tensor, orig_freq: float, new_freq: float, lowpass_width: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Band-limited resampling of `(..., num_samples)` audio between any two sample rates.

    Each output sample is a Hann-windowed sinc interpolation of the input at its exact position, with the
    cut-off at `rolloff` times the lower of the two Nyquist frequencies and `lowpass_width` zero crossings
    on each side. Works for any ratio, including non-integer rates.
    """
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} and {new_freq}")
    if orig_freq == new_freq:
        return waveform
    shape, num_samples = waveform.shape[:-1], waveform.shape[-1]
    signal = waveform.reshape(-1, num_samples).to(torch.float64)
    ratio = new_freq / orig_freq
    cutoff = min(1.0, ratio) * rolloff  # in units of the input Nyquist band
    half_width = lowpass_width / cutoff  # window half width, in input samples
    taps = torch.arange(-math.ceil(half_width) + 1, math.ceil(half_width) + 1, device=waveform.device)
    pad = math.ceil(half_width) + 1
    signal = F.pad(signal, (pad, pad))

    num_out = math.ceil(num_samples * ratio)
    chunk = max(1, (1 << 22) // len(taps))
    outputs = []
    for start in range(0, num_out, chunk):
        positions = torch.arange(start, min(start + chunk, num_out), dtype=torch.float64, device=waveform.device)
        positions = positions / ratio
        index = positions.floor().long()[:, None] + taps[None]
        distance = positions[:, None] - index
        window = torch.where(distance.abs() < half_width, torch.cos(distance * (math.pi / (2 * half_width))) ** 2, 0.0)
        kernel = cutoff * torch.sinc(cutoff * distance) * window
        outputs.append((signal[:, index + pad] * kernel).sum(-1))
    resampled = torch.cat(outputs, dim=-1) if outputs else signal[:, :0]
    return resampled.to(waveform.dtype).reshape(*shape, num_out)


def _package_component_classes() -> Optional[Dict[str, type]]:
    """The component classes of the installed `diffused_heads` package, when this file is imported from it.

    Loaded as remote code (`trust_remote_code=True`) this file stands alone and the classes come from the
    files stored beside the weights instead."""
    import importlib

    if not __package__:
        return None
    try:
        unet_module = importlib.import_module(".unet.unet_diffused_heads", __package__)
        encoder_module = importlib.import_module(".audio_encoder.audio_encoder_diffused_heads", __package__)
    except ImportError:
        return None
    return {"unet": unet_module.DiffusedHeadsUNetModel, "audio_encoder": encoder_module.DiffusedHeadsAudioEncoder}


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
    """

    model_cpu_offload_seq = "audio_encoder->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet,
        audio_encoder,
        scheduler: Union[SchedulerMixin, KarrasDiffusionSchedulers],
        trained_clip_seconds: Optional[float] = None,
        stabilize_every: Optional[int] = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, audio_encoder=audio_encoder, scheduler=scheduler)
        self.register_to_config(trained_clip_seconds=trained_clip_seconds, stabilize_every=stabilize_every)

    # --- loading and saving: a folder that loads again, with the code of the pipeline and both components ---

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a saved pipeline with the classes of the installed package (no `trust_remote_code` needed).

        `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` loads the code stored with the weights
        instead. Components passed as
        keyword arguments replace the stored ones; `torch_dtype`, `variant`, `revision`, `token`, `cache_dir`
        and `local_files_only` are passed on to the components.
        """
        classes = _package_component_classes()
        if classes is None:
            kwargs.setdefault("trust_remote_code", True)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        import diffusers

        shared = {
            k: kwargs.pop(k) for k in ("variant", "revision", "token", "cache_dir", "local_files_only") if k in kwargs
        }
        torch_dtype = kwargs.pop("torch_dtype", None)
        config = cls.load_config(pretrained_model_name_or_path, **shared)
        components = {}
        for name, model_class in classes.items():
            if name not in kwargs:
                components[name] = model_class.from_pretrained(
                    pretrained_model_name_or_path, subfolder=name, torch_dtype=torch_dtype, **shared
                )
        if "scheduler" not in kwargs:
            scheduler_class = getattr(diffusers, config["scheduler"][1])
            shared.pop("variant", None)
            components["scheduler"] = scheduler_class.from_pretrained(
                pretrained_model_name_or_path, subfolder="scheduler", **shared
            )
        unknown = set(kwargs) - {"unet", "audio_encoder", "scheduler", "trained_clip_seconds", "stabilize_every"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(unknown)}")
        for name in ("trained_clip_seconds", "stabilize_every"):
            components[name] = config.get(name)
        return cls(**{**components, **kwargs})

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            if module is not None and self._is_custom(module):
                file_stem = os.path.splitext(os.path.basename(inspect.getsourcefile(type(module))))[0]
                self.register_to_config(**{name: (file_stem, type(module).__name__)})

    @staticmethod
    def _is_custom(module) -> bool:
        return type(module).__module__.split(".")[0] not in ("diffusers", "transformers", "torch")

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs):
        """Save the pipeline with its code: `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` loads it.

        Takes the arguments of [`DiffusionPipeline.save_pretrained`]; with `push_to_hub=True` (and optionally
        `repo_id`, `token`, `private`, `commit_message`, `create_pr`) the folder is then uploaded.
        """
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs
        }
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        self._write_code(save_directory)
        if push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = hub_kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = create_repo(
                repo_id, exist_ok=True, private=hub_kwargs.get("private"), token=hub_kwargs.get("token")
            ).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=save_directory,
                token=hub_kwargs.get("token"),
                commit_message=hub_kwargs.get("commit_message", "Upload DiffusedHeadsPipeline"),
                create_pr=hub_kwargs.get("create_pr", False),
            )

    def _write_code(self, save_directory) -> None:
        pipeline_file = inspect.getsourcefile(type(self))
        shutil.copyfile(pipeline_file, os.path.join(save_directory, os.path.basename(pipeline_file)))
        for name in ("unet", "audio_encoder"):
            module = getattr(self, name)
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

    # --- inputs ---

    @property
    def _learns_variance(self) -> bool:
        """Whether the scheduler is given the variance channels too: only the DDPM schedulers use them.

        `from_config` copies `variance_type` into schedulers that ignore it, and DPM-Solver accepts a learned
        variance but drops it (and fails on it with v-prediction), so every other scheduler gets the first
        channels only."""
        from diffusers import DDPMParallelScheduler, DDPMScheduler

        is_ddpm = isinstance(self.scheduler, (DDPMScheduler, DDPMParallelScheduler))
        return is_ddpm and self.scheduler.config.get("variance_type") in ("learned", "learned_range")

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

    def check_inputs(self, num_inference_steps, stabilize_every, output_type, sampling_rate, callback_inputs):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if stabilize_every is not None and (not isinstance(stabilize_every, int) or stabilize_every < 0):
            raise ValueError(f"stabilize_every must be None, 0 (off) or a positive integer, got {stabilize_every!r}")
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        if not isinstance(sampling_rate, (int, float)) or not sampling_rate > 0:
            raise ValueError(f"sampling_rate must be a positive number, got {sampling_rate!r}")
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")

    def prepare_inputs(self, identity_image, audio, sampling_rate):
        """Identity frames `(B, 3, S, S)` in [-1, 1], 16 kHz waveforms `(B, N)` zero-padded to the longest, and
        each waveform's own length, with batch broadcasting."""
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
        identities = torch.stack(identities * (batch // len(identities)))
        waveforms = waveforms * (batch // len(waveforms))
        lengths = [w.shape[-1] for w in waveforms]
        # Zeros after a clip change none of its windows (the encoder pads with zeros) nor, the GRU being causal,
        # its embeddings; each clip's audio window is clamped at its own end in the loop.
        waveforms = torch.stack([F.pad(w, (0, max(lengths) - w.shape[-1])) for w in waveforms])
        return identities, waveforms, lengths

    def postprocess(self, frames: torch.Tensor, output_type: str):
        """`(B, F, 3, H, W)` frames in [-1, 1] to the requested output type, in [0, 1]."""
        frames = ((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
        if output_type == "pt":
            return frames
        array = frames.permute(0, 1, 3, 4, 2).numpy()
        if output_type == "np":
            return array
        return [[PIL.Image.fromarray((frame * 255.0).round().astype(np.uint8)) for frame in video] for video in array]

    # --- generation ---

    @torch.no_grad()
    def __call__(
        self,
        identity_image: Union[ImageInput, List[ImageInput]],
        audio: Union[AudioInput, List[AudioInput]],
        sampling_rate: int = 16000,
        num_inference_steps: int = 100,
        stabilize_every: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[["DiffusedHeadsPipeline", int, int, Dict[str, Any]], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
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
                padded, each clamped at its own end) and each video keeps its own length: `frames` and `audio` are
                then lists with one entry per video.
            sampling_rate (`int`, defaults to 16000): Sample rate of `audio`; resampled to 16 kHz if different.
            num_inference_steps (`int`, defaults to 100): Denoising steps per frame.
            stabilize_every (`int`, *optional*): Every this many frames, replace the older motion frame with the
                identity frame, which limits drift on long clips (15 in the authors' training configuration); 0
                turns it off. Defaults to the model's own setting (`pipe.config.stabilize_every`), if any.
            generator (`torch.Generator` or a list of them, *optional*): Makes generation deterministic.
            latents (`torch.Tensor`, *optional*): Initial noise `(batch_size, num_frames, 3, height, width)`, one
                image per frame (`num_frames` of the longest clip); drawn with `generator` if not given.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"` or `"pil"`.
            return_dict (`bool`, defaults to `True`): Return a [`DiffusedHeadsPipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after every denoising step as
                `callback_on_step_end(pipe, step, timestep, callback_kwargs)`, with `step` counted over all frames;
                may return a dict with a replacement `latents` (the current frame being denoised).
            callback_on_step_end_tensor_inputs (`List[str]`): Tensors passed in `callback_kwargs`.

        Returns:
            [`DiffusedHeadsPipelineOutput`] or `tuple`: the frames, and the 16 kHz audio they match.
        """
        self.check_inputs(
            num_inference_steps, stabilize_every, output_type, sampling_rate, callback_on_step_end_tensor_inputs
        )
        if stabilize_every is None:
            stabilize_every = self.config.get("stabilize_every")
        if self.unet.config.audio_embedding_dim != self.audio_encoder.config.hidden_size:
            raise ValueError(
                f"the UNet expects audio embeddings of size {self.unet.config.audio_embedding_dim}, the audio "
                f"encoder makes {self.audio_encoder.config.hidden_size}"
            )
        device = self._execution_device
        dtype = self.unet.dtype

        # 1. Inputs: identity frames in [-1, 1] and one audio embedding per video frame.
        identity, waveforms, lengths = self.prepare_inputs(identity_image, audio, sampling_rate)
        identity = identity.to(device=device, dtype=dtype)
        encoder_dtype = self.audio_encoder.dtype
        audio_embeddings = self.audio_encoder(waveforms.to(device=device, dtype=encoder_dtype)).audio_embeddings
        audio_embeddings = audio_embeddings.to(dtype)
        batch_size, num_frames = audio_embeddings.shape[:2]
        frame_counts = torch.tensor([self.audio_encoder.num_frames(n) for n in lengths])
        ragged = len(set(lengths)) > 1
        longest = self.config.get("trained_clip_seconds")
        seconds = waveforms.shape[-1] / self.audio_encoder.config.sampling_rate
        if longest and seconds > longest and not stabilize_every:
            logger.warning(
                f"the audio is {seconds:.1f} s long; this model was trained on clips up to about {longest:g} s and "
                "may drift on longer ones: pass stabilize_every (e.g. 15) to put the identity frame back regularly"
            )

        # 2. Initial noise for every frame.
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        shape = (batch_size, num_frames, channels, size, size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} videos; give one per video")
        # The samples and the scheduler's update stay in float32 whatever the UNet's dtype: in half precision the
        # update's small differences of large terms would lose most of their digits.
        if latents is None and isinstance(generator, list):
            # Each clip's noise drawn as a run of that clip alone draws it, so batching does not change it.
            latents = torch.zeros(shape, device=device)
            for k, count in enumerate(frame_counts.tolist()):
                latents[k, :count] = randn_tensor((1, count, *shape[2:]), generator=generator[k], device=device)[0]
        elif latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        # 3. Frame by frame.
        learns_variance = self._learns_variance
        self._warn_on_mismatched_spacing()
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        context = self.unet.config.audio_context
        motion_channels = self.unet.config.motion_frame_channels
        identity_motion = to_motion_frame(identity, motion_channels)
        motion = [identity_motion, identity_motion]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        steps_per_frame = len(self.scheduler.timesteps)
        frames = []
        with self.progress_bar(total=num_frames * steps_per_frame) as progress_bar:
            for frame_index in range(num_frames):
                if stabilize_every and frame_index > 0 and frame_index % stabilize_every == 0:
                    motion[0] = identity_motion
                motion_frames = torch.cat(motion, dim=1)
                audio_context = audio_window(audio_embeddings, frame_index, context, frame_counts)

                # Multistep schedulers keep state: start every frame afresh.
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                sample = latents[:, frame_index] * self.scheduler.init_noise_sigma
                for step_index, t in enumerate(self.scheduler.timesteps):
                    model_input = self.scheduler.scale_model_input(sample, t).to(dtype)
                    model_output = self.unet(model_input, t, identity, motion_frames, audio_context).sample.float()
                    if not learns_variance:
                        model_output = model_output[:, :channels]
                    sample = self.scheduler.step(model_output, t, sample, **step_kwargs).prev_sample

                    if callback_on_step_end is not None:
                        callback_kwargs = {"latents": sample}
                        global_step = frame_index * steps_per_frame + step_index
                        callback_outputs = callback_on_step_end(self, global_step, t, callback_kwargs) or {}
                        sample = callback_outputs.pop("latents", sample)
                    progress_bar.update()

                frames.append(sample)
                motion = [motion[1], to_motion_frame(sample.to(dtype), motion_channels)]

        self.maybe_free_model_hooks()

        # 4. Output.
        video = self.postprocess(torch.stack(frames, dim=1), output_type)
        audio_out = waveforms.cpu().numpy()
        if ragged:  # each video and its audio at their own length
            video = [item[:count] for item, count in zip(video, frame_counts.tolist())]
            audio_out = [item[:length] for item, length in zip(audio_out, lengths)]
        if not return_dict:
            return (video, audio_out)
        return DiffusedHeadsPipelineOutput(frames=video, audio=audio_out)
