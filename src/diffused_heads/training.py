"""The training library that `train` and `distill` share: the data (training frames read a few at a time, the batch
plan of every step, the frozen encoder's embeddings kept on disk), the diffusion objective, the models a run starts
from, checkpoints, and the accelerate loop itself (optimiser, learning-rate schedule, EMA, gradient clipping,
logging, resuming). A method gives the loop one function: a batch in, its losses out.

    data = open_data(folder, split, checkpoint_dir, size, accelerator)
    models = training_loop(settings, accelerator, {"unet": unet}, data, embeddings, losses_of_batch)

Every step's random numbers follow from the seed, the process and the step (`step_generator`), so a resumed run
draws what an unbroken one draws.
"""

import copy
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .dataset import PreparedDataset, convert_clip_folder, is_prepared
from .errors import MediaError
from .hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
from .hub.pipeline_diffused_heads import (
    ORIGINAL_SCHEDULER_CONFIG,
    DiffusedHeadsPipeline,
    audio_window,
    to_motion_frame,
)
from .hub.unet.unet_diffused_heads import NUM_MOTION_FRAMES, DiffusedHeadsUNetModel
from .media import resize_frames

logger = logging.getLogger(__name__)

# shipped in `builtin/` (48×48, about 3.5 M UNet parameters).
PRESETS = {
    "crema": {"unet": {}, "audio_encoder": {}},
    "builtin": {
        "unet": dict(
            sample_size=48,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            attention_levels=(False, False, True),
            attention_head_dim=32,
            norm_num_groups=8,
            audio_embedding_dim=64,
            dropout=0.0,
        ),
        "audio_encoder": dict(
            conv_channels=(16, 32, 32),
            conv_kernel_sizes=(80, 8, 4),
            conv_strides=(16, 4, 2),
            conv_paddings=(32, 2, 1),
            code_size=64,
            hidden_size=64,
            num_gru_layers=1,
        ),
    },
}
LIP_BOX_MARGIN = 5 / 128  # the original's ±5 px around the mouth at 128×128, as a fraction of the size


class TrainingError(ValueError):
    """A problem with the training inputs, reported as one line (`error: ...`)."""


# --------------------------------------------------------------------------------------------------
# Data


def step_generator(seed: int, process_index: int, step: int, stream: int) -> torch.Generator:
    """The random numbers of one step of one process: a pure function of the seed, the process and the step, so
    that a resumed run draws what an unbroken one draws, however far the data loader reads ahead."""
    state = np.random.SeedSequence([seed, process_index, step, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def plan_batch(frame_counts: List[int], batch_size: int, generator: torch.Generator, motion_dropout: float = 0.0):
    """The samples of a batch as (clip, target frame, identity frame, motion dropped): a random clip, a random
    target frame of it, and another random frame of the same clip as the identity."""
    plans = []
    for index in torch.randint(len(frame_counts), (batch_size,), generator=generator).tolist():
        count = frame_counts[index]
        target = int(torch.randint(count, (1,), generator=generator))
        identity = int(torch.randint(count, (1,), generator=generator))
        dropped = motion_dropout > 0 and float(torch.rand(1, generator=generator)) < motion_dropout
        plans.append((index, target, identity, bool(dropped)))
    return plans


class StepBatches:
    """The batch plans of steps `start` to `stop` of one process (a `batch_sampler` for the DataLoader)."""

    def __init__(self, frame_counts, batch_size, seed, process_index, start, stop, motion_dropout=0.0):
        self.frame_counts, self.batch_size, self.motion_dropout = frame_counts, batch_size, motion_dropout
        self.seed, self.process_index, self.start, self.stop = seed, process_index, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            generator = step_generator(self.seed, self.process_index, step, 0)
            yield plan_batch(self.frame_counts, self.batch_size, generator, self.motion_dropout)


class TrainingFrames(torch.utils.data.Dataset):
    """Training samples read from a prepared dataset, a few frames at a time: an index is a sample's plan (see
    `plan_batch`); the sample holds the target frame, the `history` frames before it (the clip's previous frames,
    oldest first, the identity frame before the clip's start; 2, the motion frames, for training), the identity
    frame, the mouth box, and either the audio windows of the last `history - 1` frames (from embeddings
    precomputed on disk; the last is the target's) or the clip's waveform (when the encoder trains)."""

    def __init__(
        self,
        data: PreparedDataset,
        size: int,
        context: int,
        embeddings: Optional[str] = None,
        history: int = NUM_MOTION_FRAMES,
    ):
        if history < NUM_MOTION_FRAMES:
            raise ValueError(f"history must be at least {NUM_MOTION_FRAMES}, got {history}")
        self.data, self.size, self.context, self.embeddings, self.history = data, size, context, embeddings, history

    def __len__(self) -> int:
        return self.data.num_frames

    def __getitem__(self, plan) -> dict:
        index, target, identity_index, dropped = plan
        clip = self.data.clips[index]
        first = max(0, target - self.history)
        stacked = np.concatenate(
            [self.data.frames(clip, first, target - first + 1), self.data.frame(clip, identity_index)[None]]
        )
        frames = torch.from_numpy(resize_frames(stacked, self.size)).permute(0, 3, 1, 2)
        recent, identity = frames[:-1], frames[-1]
        history = []
        for back in range(self.history, 0, -1):  # oldest first
            source = target - back
            # Motion dropout replaces the motion frames (the last two) by the identity frame.
            replaced = dropped and back <= NUM_MOTION_FRAMES
            history.append(identity if replaced or source < 0 else recent[source - first])
        sample = {
            "clip": index,
            "target": target,
            "x_start": recent[target - first],
            "identity": identity,
            "motion": torch.stack(history),
            "boxes": None,
        }
        boxes = self.data.mouth_boxes(clip)
        if boxes is not None:
            sample["boxes"] = torch.from_numpy(boxes[target] / self.data.size)
        if self.embeddings is not None:
            embeddings = torch.from_numpy(np.load(os.path.join(self.embeddings, clip.id + ".npy")))
            frames_back = range(self.history - NUM_MOTION_FRAMES, -1, -1)
            sample["audio"] = torch.stack([audio_window(embeddings, target - b, self.context) for b in frames_back])
        else:
            sample["waveform"] = torch.from_numpy(self.data.audio(clip))
        return sample


def collate_samples(samples: List[dict]) -> dict:
    """A batch of `TrainingFrames` samples, frames in [-1, 1]: `motion` is `(B, history, 3, S, S)` and `audio`
    `(B, history - 1, context, dim)`."""
    to_unit = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
    batch = {
        "clip": [s["clip"] for s in samples],
        "target": [s["target"] for s in samples],
        "x_start": to_unit(torch.stack([s["x_start"] for s in samples])),
        "identity": to_unit(torch.stack([s["identity"] for s in samples])),
        "motion": to_unit(torch.stack([s["motion"] for s in samples])),
        "boxes": torch.stack([s["boxes"] for s in samples]) if all(s["boxes"] is not None for s in samples) else None,
    }
    if "audio" in samples[0]:
        batch["audio"] = torch.stack([s["audio"] for s in samples])
    else:
        batch["waveforms"] = [s["waveform"] for s in samples]
    return batch


def open_data(
    folder: str, split: str, checkpoint_dir: str, size: int, accelerator, min_frames: int = 2
) -> PreparedDataset:
    """The training data: a prepared dataset (its `split`: train, test or all), or a folder of ready clips, which
    the main process writes as a prepared dataset into the checkpoint folder once (then read from there). Clips of
    fewer than `min_frames` frames are left out."""
    source = folder
    if not os.path.isdir(folder):
        raise TrainingError(f"the data folder {folder} does not exist")
    if not is_prepared(folder):
        converted = os.path.join(checkpoint_dir, "data")
        if accelerator.is_main_process:
            if not is_prepared(converted) or PreparedDataset(converted).manifest.get(
                "prepared_from"
            ) != os.path.abspath(folder):
                logger.info(f"{folder} holds ready clips: storing them as a prepared dataset in {converted}")
                try:
                    convert_clip_folder(folder, converted, size)
                except MediaError as error:
                    raise TrainingError(str(error)) from None
        accelerator.wait_for_everyone()
        folder = converted
    try:
        data = PreparedDataset(folder, None if split == "all" else split)
        for clip in data.clips:
            data.check(clip)
    except MediaError as error:
        raise TrainingError(str(error)) from None
    longest = max((c.frames for c in data.clips), default=0)
    data.clips = [c for c in data.clips if c.frames >= min_frames]
    if not data.clips:
        which = f" (split {split})" if split != "all" else ""
        if longest:
            raise TrainingError(
                f"no clip in {source}{which} is long enough: the longest has {longest} frames, and {min_frames} "
                "are needed for the motion context"
            )
        raise TrainingError(f"no usable clips in {source}{which}")
    return data


def _fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def embeddings_folder(encoder, folder: str) -> str:
    """Where a frozen encoder's embeddings are kept: `folder/<fingerprint of its weights>`."""
    return os.path.join(folder, _fingerprint(encoder))


def precompute_embeddings(encoder, data: PreparedDataset, target: str, device, show: bool = True) -> str:
    """The frozen encoder's embeddings of every clip, one `.npy` per clip in `target` (see `embeddings_folder`;
    clips done before are kept, so a resumed run reuses them)."""
    from tqdm.auto import tqdm

    os.makedirs(target, exist_ok=True)
    missing = [c for c in data.clips if not os.path.isfile(os.path.join(target, c.id + ".npy"))]
    with torch.no_grad():
        for clip in tqdm(missing, desc="audio embeddings", unit="clip", disable=not show or not missing):
            waveform = torch.from_numpy(data.audio(clip))[None].to(device)
            embeddings = encoder(waveform).audio_embeddings[0].float().cpu().numpy()
            np.save(os.path.join(target, clip.id + ".npy.tmp.npy"), embeddings)
            os.replace(os.path.join(target, clip.id + ".npy.tmp.npy"), os.path.join(target, clip.id + ".npy"))
    return target


# --------------------------------------------------------------------------------------------------
# Objective


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) for images in [-1, 1] quantised to 256 levels under N(mean, exp(log_scale)^2), elementwise."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_minus = _standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


class NoiseSchedule:
    """A scheduler's noise schedule as one table and its parameterisation: the arithmetic of the training objective
    and of the distillation losses. alpha-bar is the cumulative product of its betas in float64 (1 - alpha_bar near
    t = 0 loses most of its digits in float32); values are cast to the tensors they meet."""

    def __init__(self, scheduler, prediction_type: Optional[str] = None):
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}"
            )
        self.betas = scheduler.betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_train_timesteps = len(self.betas)
        self._alpha_bar_to_clean = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # [-1]: 1

    def at(self, values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`values[timesteps]`, shaped `(B, 1, ...)` to broadcast over `like`, in its dtype on its device."""
        return (
            values[timesteps.cpu().long()].to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
        )

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at `timesteps`; 1 where a timestep is -1 (the clean end of a grid)."""
        return self.at(self._alpha_bar_to_clean, timesteps, like)

    def add_noise(self, x_start, noise, timesteps):
        alpha_bar = self.alpha_bar(timesteps, x_start)
        return alpha_bar.sqrt() * x_start + (1.0 - alpha_bar).sqrt() * noise

    def target(self, x_start, noise, timesteps):
        """What the first output channels are trained to predict: the noise, or v = sqrt(alpha_bar) * noise -
        sqrt(1 - alpha_bar) * x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x_start
        alpha_bar = self.alpha_bar(timesteps, x_start)
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x_start

    def predicted_noise(self, prediction, x_t, timesteps):
        """The noise that a prediction (the first output channels) implies."""
        if self.prediction_type == "epsilon":
            return prediction
        if self.prediction_type == "sample":
            return self.noise_of(prediction, x_t, timesteps)
        alpha_bar = self.alpha_bar(timesteps, x_t)
        return alpha_bar.sqrt() * prediction + (1.0 - alpha_bar).sqrt() * x_t

    def predicted_clean(self, prediction, x_t, timesteps):
        """The clean frame that a prediction implies."""
        if self.prediction_type == "sample":
            return prediction
        alpha_bar = self.alpha_bar(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1.0 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        return alpha_bar.sqrt() * x_t - (1.0 - alpha_bar).sqrt() * prediction

    def noise_of(self, x_start, x_t, timesteps):
        """The noise that takes `x_start` to `x_t` at `timesteps` (DDIM's noise for a clean-frame estimate)."""
        alpha_bar = self.alpha_bar(timesteps, x_t)
        return (x_t - alpha_bar.sqrt() * x_start) / (1.0 - alpha_bar).sqrt().clamp(min=1e-8)


def motion_input(older: torch.Tensor, newer: torch.Tensor, channels: int) -> torch.Tensor:
    """Two frames `(B, 3, S, S)` in [-1, 1], oldest first, as the UNet's motion input (what the training objective
    and the pipeline give it too)."""
    return torch.cat([to_motion_frame(older, channels), to_motion_frame(newer, channels)], dim=1)


def lip_loss(squared_error: torch.Tensor, mouth_mask: torch.Tensor) -> torch.Tensor:
    """The mean of `squared_error` `(B, C, H, W)` inside each sample's mouth mask `(B, 1, H, W)` (over the mask's
    pixels and the channels), averaged over the batch; a sample with an empty mask counts as 0."""
    mask = mouth_mask.to(squared_error.dtype)
    channels = squared_error.shape[1]
    per_sample = (squared_error * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * channels).clamp(min=1.0)
    return per_sample.mean()


def add_lip_loss(losses: dict, squared_error, mouth_mask: Optional[torch.Tensor], lip_weight: float) -> dict:
    """`losses` with the lip term (`lip_loss`) as `"lip"` and its weight times it added to `"loss"`, where there is
    a mouth mask and a weight."""
    if mouth_mask is not None and lip_weight:
        losses["lip"] = lip_loss(squared_error, mouth_mask)
        losses["loss"] = losses["loss"] + lip_weight * losses["lip"]
    return losses


class DiffusionObjective:
    """The training loss of a UNet with learned-range variance, on a scheduler's schedule.

    The first `channels` outputs predict the noise (`prediction_type="epsilon"`, the original) or the velocity
    v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x_0 (`"v_prediction"`); L_simple and the lip loss are
    the MSE on that target, and L_vlb uses the noise implied by it.
    """

    def __init__(self, scheduler, vlb_weight: float = 1e-4, lip_weight: float = 0.2, prediction_type=None):
        self.schedule = NoiseSchedule(scheduler, prediction_type)
        self.prediction_type = self.schedule.prediction_type
        if self.prediction_type == "sample":
            raise ValueError("prediction_type must be 'epsilon' or 'v_prediction' for training, got 'sample'")
        betas, alphas_cumprod = self.schedule.betas, self.schedule.alphas_cumprod
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        self.num_train_timesteps = self.schedule.num_train_timesteps
        # Tables stay in float64 and are cast to the dtype of the tensors they meet.
        self.log_betas = torch.log(betas)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_x0 = betas * previous.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_xt = (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.vlb_weight = vlb_weight
        self.lip_weight = lip_weight

    def add_noise(self, x_start, noise, timesteps):
        return self.schedule.add_noise(x_start, noise, timesteps)

    def target(self, x_start, noise, timesteps):
        return self.schedule.target(x_start, noise, timesteps)

    def predicted_noise(self, prediction, x_t, timesteps):
        return self.schedule.predicted_noise(prediction, x_t, timesteps)

    def vlb_terms(self, model_output, x_start, x_t, timesteps):
        """The bound term L_{t-1} of every sample, in bits per dimension, with the predicted noise detached:
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder's -log p(x_0 | x_1) for t = 0."""
        channels = x_start.shape[1]
        at = self.schedule.at
        eps = self.predicted_noise(model_output[:, :channels].detach(), x_t, timesteps)
        var_values = model_output[:, channels:]
        alpha_bar = self.schedule.alpha_bar(timesteps, x_t)
        pred_x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        coef_x0 = at(self.posterior_mean_x0, timesteps, x_t)
        coef_xt = at(self.posterior_mean_xt, timesteps, x_t)
        model_mean = coef_x0 * pred_x0 + coef_xt * x_t
        true_mean = coef_x0 * x_start + coef_xt * x_t
        min_log = at(self.posterior_log_variance, timesteps, x_t)
        max_log = at(self.log_betas, timesteps, x_t)
        fraction = (var_values + 1.0) / 2.0
        model_log_variance = fraction * max_log + (1.0 - fraction) * min_log
        kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(timesteps == 0, nll, kl)

    def __call__(self, model_output, noise, x_start, x_t, timesteps, mouth_mask=None) -> Dict[str, torch.Tensor]:
        channels = x_start.shape[1]
        prediction = model_output[:, :channels]
        squared = (prediction.float() - self.target(x_start, noise, timesteps).float()) ** 2
        losses = {"simple": squared.mean()}
        losses["loss"] = losses["simple"]
        if model_output.shape[1] > channels:
            losses["vlb"] = self.vlb_terms(model_output.float(), x_start.float(), x_t.float(), timesteps).mean()
            losses["loss"] = losses["loss"] + self.vlb_weight * losses["vlb"]
        return add_lip_loss(losses, squared, mouth_mask, self.lip_weight)


# --------------------------------------------------------------------------------------------------
# Batches


def lip_box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes in fractions of the size, widened by the lip-box margin, to (B, 1, size, size) masks."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x0, y0, x1, y1 = (boxes - torch.tensor([LIP_BOX_MARGIN, LIP_BOX_MARGIN, -LIP_BOX_MARGIN, -LIP_BOX_MARGIN])).unbind(
        1
    )
    inside_x = (coords[None] >= x0[:, None]) & (coords[None] <= x1[:, None])
    inside_y = (coords[None] >= y0[:, None]) & (coords[None] <= y1[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None].float()


# --------------------------------------------------------------------------------------------------
# Training


class TrainingState:
    """The step counter and the seconds spent training so far, over every resumed run, saved with every checkpoint
    (each step's random numbers follow from the step)."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0

    def state_dict(self):
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))  # checkpoints of older versions did not keep it


# --------------------------------------------------------------------------------------------------
# Models

# The sampling defaults a saved model carries in its pipeline config.
MODEL_DEFAULTS = ("trained_clip_seconds", "stabilize_every", "num_inference_steps")


def load_model(folder: str, flag: str = "--init-from") -> DiffusedHeadsPipeline:
    """A saved pipeline to start from (a folder or a Hub id), on the CPU in float32 (loaded without diffusers'
    loading bar: the run shows its own progress)."""
    from diffusers.utils import logging as diffusers_logging

    local = os.path.isabs(folder) or folder.startswith(".") or os.path.exists(folder)
    if local and not os.path.isdir(folder):
        raise TrainingError(f"{flag} {folder} could not be loaded: no such folder")
    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        return DiffusedHeadsPipeline.from_pretrained(folder)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise TrainingError(f"{flag} {folder} could not be loaded: {reason}") from None
    finally:
        if bar_was_on:
            diffusers_logging.enable_progress_bar()


def model_defaults(pipe: DiffusedHeadsPipeline) -> dict:
    """The sampling defaults of a saved model (see `MODEL_DEFAULTS`)."""
    return {name: pipe.config.get(name) for name in MODEL_DEFAULTS}


def new_model(preset: dict, prediction_type: str, seed: int):
    """A new UNet, audio encoder and training scheduler from a configuration `{"unet": ..., "audio_encoder": ...}`
    (see `PRESETS`)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    try:
        unet = DiffusedHeadsUNetModel(**preset.get("unet", {}))
        encoder = DiffusedHeadsAudioEncoder(**preset.get("audio_encoder", {}))
    except (TypeError, ValueError) as error:
        raise TrainingError(f"invalid model configuration: {error}") from None
    scheduler = DDPMScheduler(**{**ORIGINAL_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return unet, encoder, scheduler


def check_components(unet, encoder) -> None:
    if unet.config.audio_embedding_dim != encoder.config.hidden_size:
        raise TrainingError("the UNet's audio_embedding_dim differs from the audio encoder's hidden_size")
    if unet.config.out_channels not in (unet.config.in_channels, 2 * unet.config.in_channels):
        raise TrainingError("out_channels must be in_channels (noise only) or twice that (noise and variance)")


# --------------------------------------------------------------------------------------------------
# Checkpoints


def run_device(accelerator) -> str:
    """Where a run trained, for its record and model card: processes, device type and CPU threads."""
    return f"{accelerator.num_processes} x {accelerator.device.type} ({torch.get_num_threads()} threads)"


SAMPLES_FILE = "samples.png"


def write_sample_sheet(pipe: DiffusedHeadsPipeline, data: PreparedDataset, folder: str, count: int = 8) -> str:
    """A picture of what a saved model makes, for its model card: the first `count` frames it generates (seed 0,
    its own steps and sampler) from the first frame and the speech of the first clip of `data`, above the clip's
    own frames; written as `SAMPLES_FILE` into `folder`. Returns the card's text for it."""
    import PIL.Image

    from .media import SAMPLES_PER_FRAME

    clip = data.clips[0]
    count = min(count, clip.frames)
    size = pipe.unet.config.sample_size
    waveform = data.audio(clip)[: count * SAMPLES_PER_FRAME]
    pipe.set_progress_bar_config(disable=True)
    made = pipe(data.frame(clip, 0), waveform, generator=torch.Generator().manual_seed(0)).frames[0][:count]
    made = (made * 255.0).round().astype(np.uint8)
    real = resize_frames(data.frames(clip, 0, count), size)
    tile = max(size, 96)  # small models' frames shown larger
    sheet = PIL.Image.new("RGB", (tile * count, tile * 2), "white")
    for row, frames in enumerate((made, real)):
        for k, frame in enumerate(frames):
            sheet.paste(PIL.Image.fromarray(frame).resize((tile, tile), PIL.Image.BICUBIC), (k * tile, row * tile))
    sheet.save(os.path.join(folder, SAMPLES_FILE))
    return (
        f"![the first {count} frames made, above the clip's own]({SAMPLES_FILE})\n\nTop: the first {count} frames "
        f"the model makes from the first frame and the speech of clip `{clip.id}` of its training data (seed 0, its "
        "own sampler and steps); bottom: that clip's own frames."
    )


def list_checkpoints(folder: str) -> List[str]:
    """The `checkpoint-STEP` folders of a run, oldest first."""
    found = glob.glob(os.path.join(folder, "checkpoint-*"))
    return sorted((p for p in found if p.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[-1]))


def checkpoint_to_resume(resume: Optional[str], checkpoint_dir: str) -> Optional[str]:
    """The checkpoint folder `resume` names: `"latest"` (the newest in `checkpoint_dir`) or a folder."""
    if not resume:
        return None
    path = resume
    if path == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint in {checkpoint_dir}")
        path = found[-1]
    if not os.path.isdir(path):
        raise TrainingError(f"--resume: {path} is not a checkpoint folder")
    return path


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopSettings:
    """What the loop needs to know of a run (the options every training command has)."""

    checkpoint_dir: str
    max_steps: int = 3000
    batch_size: int = 10
    learning_rate: float = 5e-5
    lr_warmup_steps: int = 0
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    log_every: int = 25
    seed: int = 0
    num_workers: int = 0
    motion_dropout: float = 0.0
    report_to: str = "jsonl"  # besides the JSON-lines log: "tensorboard", "wandb" or "all" (accelerate's trackers)

    @classmethod
    def from_args(cls, args) -> "LoopSettings":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})


def tracker_config(settings: "LoopSettings") -> dict:
    """The run's settings as accelerate's trackers record them (numbers, text and booleans only)."""
    fields = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    return {k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool))}


def make_accelerator(mixed_precision: str = "no", report_to: str = "jsonl", checkpoint_dir: Optional[str] = None):
    """accelerate's `Accelerator` for a run; without a GPU the processes of `accelerate launch` talk over gloo
    (accelerate's multi-CPU mode). `report_to` other than "jsonl" adds accelerate's trackers ("tensorboard" logs
    to `checkpoint_dir/logs`, "wandb", "all" of them), as diffusers' training examples have them; a tracker whose
    package is missing is an error that names it."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    if report_to not in ("jsonl", "tensorboard", "wandb", "all"):
        raise TrainingError(f"--report-to must be jsonl, tensorboard, wandb or all, got {report_to!r}")
    wanted = {"jsonl": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [name for name in wanted if not available[name]]
    if missing:  # (each tracker's package has the tracker's name)
        extra = ' (or the train extra: "diffused-heads-diffusers[train]")' if "tensorboard" in missing else ""
        needs = f"{' and '.join(missing)}: pip install {' '.join(missing)}{extra}"
        raise TrainingError(f"--report-to {report_to} needs {needs}")
    project = None
    if checkpoint_dir is not None:
        project = ProjectConfiguration(project_dir=checkpoint_dir, logging_dir=os.path.join(checkpoint_dir, "logs"))
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=wanted or None,
        project_config=project,
    )


def frozen_embeddings(encoder, data: PreparedDataset, checkpoint_dir: str, accelerator) -> str:
    """The frozen encoder's embeddings of every clip, computed once by the main process (see `embeddings_folder`)."""
    folder = embeddings_folder(encoder, os.path.join(checkpoint_dir, "audio-embeddings"))
    if accelerator.is_main_process:
        precompute_embeddings(encoder, data, folder, accelerator.device)
    accelerator.wait_for_everyone()
    return folder


def learning_rate_schedule(optimizer, warmup_steps: int, max_steps: int, num_processes: int):
    """A constant learning rate after a linear warm-up of `warmup_steps` optimisation steps. accelerate steps a
    prepared scheduler once per process at every step, so its counts are the steps times the processes."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


@dataclass
class PreparedRun:
    """A training run after its set-up (`prepare_run`): the prepared models (`models`, with the frozen ones moved to
    the run's device), the names of the trained ones, their EMAs and target networks, the optimiser and the
    learning-rate schedule, the state the checkpoints carry and the checkpoint to resume from."""

    models: Dict[str, torch.nn.Module]
    trained: List[str]
    parameters: List[torch.nn.Parameter]
    emas: Dict[str, object]
    targets: Dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    state: "TrainingState"
    resume_from: Optional[str]


def prepare_run(
    settings: "LoopSettings",
    accelerator,
    models: Dict[str, torch.nn.Module],
    ema_targets: bool = False,
    state: Optional["TrainingState"] = None,
) -> PreparedRun:
    """Set up a run of `training_loop`: the optimiser over the parameters that require gradients, the learning-rate
    schedule, `accelerator.prepare`, then (on the prepared models, so on the run's device) the EMA of each trained
    model, the checkpoint resumed from, if any, and with `ema_targets` each model's target network. Everything the
    run holds is then on `accelerator.device`: `tensors_off_device` finds what is not, and a run with any refuses to
    start."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    parameters = [p for model in models.values() for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise TrainingError("nothing to train: no parameter requires gradients")
    if ema_targets and not settings.ema_decay:
        raise TrainingError("this method needs an EMA of the weights as its target: --ema-decay above 0")
    resume_from = checkpoint_to_resume(settings.resume, settings.checkpoint_dir)
    # Dropout draws from the global generators: seeded per process here (accelerate's `set_seed` with
    # `device_specific`: the seed plus the process index), restored from a checkpoint on resuming.
    set_seed(settings.seed, device_specific=True)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    lr_scheduler = learning_rate_schedule(
        optimizer, settings.lr_warmup_steps, settings.max_steps, accelerator.num_processes
    )
    trained = [name for name, model in models.items() if any(p.requires_grad for p in model.parameters())]
    prepared = accelerator.prepare(*[models[n] for n in trained], optimizer, lr_scheduler)
    models = {**models, **dict(zip(trained, prepared[: len(trained)]))}
    optimizer, lr_scheduler = prepared[len(trained) :]
    device = accelerator.device
    for name, model in models.items():
        if name not in trained:
            model.to(device).eval()
    # The EMAs are made from the prepared models, so their weights are on the run's device from the start.
    emas = {}
    if settings.ema_decay:
        for name in trained:
            emas[name] = EMAModel(models[name].parameters(), decay=settings.ema_decay, use_ema_warmup=True)
            emas[name].to(device)
            accelerator.register_for_checkpointing(emas[name])
    state = state if state is not None else TrainingState()
    accelerator.register_for_checkpointing(state)
    if resume_from:
        accelerator.load_state(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        for ema in emas.values():  # (accelerate loads them onto the CPU)
            ema.to(device)
    targets = {}
    if ema_targets:
        for name in trained:
            target = copy.deepcopy(accelerator.unwrap_model(models[name])).requires_grad_(False).eval()
            emas[name].copy_to(target.parameters())
            targets[name + "_target"] = target
    run = PreparedRun(models, trained, parameters, emas, targets, optimizer, lr_scheduler, state, resume_from)
    misplaced = tensors_off_device(run, device)
    if misplaced:
        raise RuntimeError(f"the run's tensors are not all on {device}: {', '.join(misplaced[:5])}")
    return run


def tensors_off_device(run: PreparedRun, device) -> List[str]:
    """What of a run is not on `device`: the models' parameters and buffers, the EMA weights, the target networks
    and the optimiser's state, by name."""
    device = torch.device(device)

    def same(tensor) -> bool:
        if tensor.device.type != device.type:
            return False
        return device.type != "cuda" or device.index is None or tensor.device.index == device.index

    found = []
    for name, model in {**run.models, **run.targets}.items():
        for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            found += [f"{name} {kind} {key} ({t.device})" for key, t in tensors if not same(t)]
    for name, ema in run.emas.items():
        found += [f"{name} EMA weight {k} ({t.device})" for k, t in enumerate(ema.shadow_params) if not same(t)]
    for k, values in enumerate(run.optimizer.state.values()):
        found += [
            f"optimizer state {k} {key}" for key, t in values.items() if torch.is_tensor(t) and t.ndim and not same(t)
        ]
    return found


LossesOfBatch = Callable[[dict, torch.Generator, Dict[str, torch.nn.Module]], Dict[str, torch.Tensor]]


def training_loop(
    settings: LoopSettings,
    accelerator,
    models: Dict[str, torch.nn.Module],
    data: PreparedDataset,
    samples: torch.utils.data.Dataset,
    losses_of_batch: LossesOfBatch,
    description: str = "training",
    ema_targets: bool = False,
    state: Optional[TrainingState] = None,
) -> Dict[str, torch.nn.Module]:
    """Optimise the parameters of `models` that require gradients on the losses that `losses_of_batch(batch,
    generator, models)` returns (its `"loss"` is minimised; `models` are the prepared modules, `generator` the step's
    own random numbers) over the batches of `samples`, with AdamW, the learning-rate warm-up, gradient clipping, an
    EMA of each model's weights, checkpoints every `checkpoint_every` steps (resumable) and a log of the losses
    (averaged over the processes) in `train_log.jsonl`. Returns the models unwrapped, in eval mode, with the EMA
    weights (where EMA is on), on the main process; None on the others.

    With `ema_targets`, `losses_of_batch` also gets, as `models[NAME + "_target"]`, a frozen copy of each trained
    model holding its EMA weights as of the step before (a target network, as consistency distillation uses).
    A `state` given is the one used: afterwards it says the steps made and the seconds they took, over every
    resumed run."""
    from tqdm.auto import tqdm

    run = prepare_run(settings, accelerator, models, ema_targets, state)
    models, emas, targets, optimizer, lr_scheduler = run.models, run.emas, run.targets, run.optimizer, run.lr_scheduler
    trained, parameters, state, device = run.trained, run.parameters, run.state, accelerator.device

    frame_counts = [c.frames for c in data.clips]
    batches = StepBatches(
        frame_counts,
        settings.batch_size,
        settings.seed,
        accelerator.process_index,
        state.step,
        settings.max_steps,
        settings.motion_dropout,
    )
    # The loader draws its workers' seed from its own generator, not from the global one that dropout uses (whose
    # state a checkpoint restores).
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=batches,
        num_workers=settings.num_workers,
        collate_fn=collate_samples,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    for name in trained:
        models[name].train()
    log_path = os.path.join(settings.checkpoint_dir, "train_log.jsonl")
    if settings.report_to != "jsonl":
        accelerator.init_trackers(f"diffused-heads-{description}", config=tracker_config(settings))
    progress = tqdm(
        total=settings.max_steps, initial=state.step, desc=description, disable=not accelerator.is_main_process
    )
    started, running, seconds_before = time.time(), {}, state.seconds
    for batch in loader:
        generator = step_generator(settings.seed, accelerator.process_index, state.step, 1)
        losses = losses_of_batch(batch, generator, {**models, **targets})
        if not torch.isfinite(losses["loss"]):
            raise TrainingError(f"the loss became {losses['loss'].item()} at step {state.step}")
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and settings.max_grad_norm:
            accelerator.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, ema in emas.items():
            ema.step(models[name].parameters())
            if name + "_target" in targets:
                ema.copy_to(targets[name + "_target"].parameters())
        state.step += 1
        state.seconds = seconds_before + time.time() - started
        progress.update()

        names_now = sorted(losses)
        values = torch.stack([losses[k].detach().float() for k in names_now]).to(device)
        values = accelerator.reduce(values, reduction="mean")  # every process's losses, not only the main one's
        for key, value in zip(names_now, values.tolist()):
            running.setdefault(key, []).append(value)
        if state.step % settings.log_every == 0 or state.step == settings.max_steps:
            record = {"step": state.step, **{k: float(np.mean(v)) for k, v in running.items()}}
            record.update(lr=lr_scheduler.get_last_lr()[0], elapsed_s=round(state.seconds, 1))
            running = {}
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
        if state.step % settings.checkpoint_every == 0 or state.step == settings.max_steps:
            accelerator.wait_for_everyone()
            # Every process saves: the models once (by the main process), each process its own random states.
            accelerator.save_state(os.path.join(settings.checkpoint_dir, f"checkpoint-{state.step}"))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                for old in list_checkpoints(settings.checkpoint_dir)[: -settings.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
    progress.close()

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    result = {}
    for name, model in models.items():
        model = accelerator.unwrap_model(model).eval()
        if name in emas:
            emas[name].copy_to(model.parameters())
        model.requires_grad_(False)
        result[name] = model
    accelerator.print(f"{description}: {state.step} steps ({state.seconds:.0f} s)")
    return result


@dataclass
class ModelStart:
    """What a training run starts from: a saved model (`init_from`), or a new one of a preset size (or of the
    `config` file's sizes) with its own prediction type."""

    init_from: Optional[str] = None
    preset: str = "tiny"
    config: Optional[str] = None  # a JSON file: {"unet": {...}, "audio_encoder": {...}}
    prediction_type: str = "epsilon"
    seed: int = 0
    train_audio_encoder: bool = False


def build_components(start: ModelStart):
    """The UNet, audio encoder and training scheduler a run starts from, and the starting model's defaults."""
    from diffusers import DDPMScheduler

    if start.init_from:
        pipe = load_model(start.init_from)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return pipe.unet, pipe.audio_encoder, scheduler, model_defaults(pipe)
    if not start.train_audio_encoder:
        raise TrainingError(
            "a new model has an untrained audio encoder: pass --train-audio-encoder, or --init-from a pipeline "
            "whose encoder is trained"
        )
    preset = PRESETS[start.preset]
    if start.config:
        try:
            with open(start.config, encoding="utf-8") as f:
                preset = json.load(f)
        except (OSError, ValueError) as error:
            raise TrainingError(f"--config {start.config} could not be read: {error}") from None
        if not isinstance(preset, dict) or set(preset) - {"unet", "audio_encoder"}:
            raise TrainingError('--config must hold a JSON object with the keys "unet" and "audio_encoder"')
    unet, encoder, scheduler = new_model(preset, start.prediction_type, start.seed)
    return unet, encoder, scheduler, {}


def pipeline_to_save(
    unet,
    encoder,
    noise_scheduler,
    defaults: dict,
    longest_clip: float,
    sampling_variance: Optional[str] = None,
    stabilize_every: Optional[int] = None,
    num_inference_steps: Optional[int] = None,
):
    """The trained pipeline as it is saved: its components, the scheduler it samples with (`sampling_variance`:
    the variance type it samples with, else the training scheduler's) and the model's own defaults (as given,
    else from the starting model)."""
    from diffusers import DDPMScheduler

    variance = sampling_variance or noise_scheduler.config.variance_type
    return DiffusedHeadsPipeline(
        unet=unet,
        audio_encoder=encoder,
        scheduler=DDPMScheduler.from_config(noise_scheduler.config, variance_type=variance),
        # The saved model warns about audio longer than what it has seen (or than its starting point had seen).
        trained_clip_seconds=round(max(longest_clip, defaults.get("trained_clip_seconds") or 0.0), 2),
        stabilize_every=stabilize_every if stabilize_every is not None else defaults.get("stabilize_every"),
        num_inference_steps=num_inference_steps or defaults.get("num_inference_steps"),
    )


def diffusion_losses(objective: DiffusionObjective, accelerator, train_audio_encoder: bool):
    """The training step's losses of a batch: the target frame noised at a random timestep, the UNet's prediction
    from it, and the objective."""

    def losses_of_batch(batch, generator, models):
        unet = models["unet"]
        device = accelerator.device
        config = accelerator.unwrap_model(unet).config
        size, context = config.sample_size, config.audio_context
        x_start = batch["x_start"].to(device)
        identity = batch["identity"].to(device)
        motion = batch["motion"].to(device)
        motion = motion_input(motion[:, 0], motion[:, 1], config.motion_frame_channels)
        if train_audio_encoder:  # one encoder pass per distinct clip of the batch
            encoder = models["audio_encoder"]
            waveforms = {c: w for c, w in zip(batch["clip"], batch["waveforms"])}
            embeddings = {c: encoder(w[None].to(device)).audio_embeddings[0] for c, w in sorted(waveforms.items())}
            audio = torch.stack(
                [audio_window(embeddings[c], t, context) for c, t in zip(batch["clip"], batch["target"])]
            )
        else:
            audio = batch["audio"][:, -1].to(device)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        timesteps = torch.randint(objective.num_train_timesteps, (len(x_start),), generator=generator).to(device)
        x_t = objective.add_noise(x_start, noise, timesteps)
        mask = lip_box_masks(batch["boxes"], size).to(device) if batch["boxes"] is not None else None
        with accelerator.autocast():
            output = unet(x_t, timesteps, identity, motion, audio).sample
        return objective(output, noise, x_start, x_t, timesteps, mask)

    return losses_of_batch
