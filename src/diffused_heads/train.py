"""Train the Diffused Heads UNet (and optionally the audio encoder) on a folder of talking-face clips.

    diffused-heads train --data data/train --output-dir my-model --preset builtin --train-audio-encoder
    accelerate launch -m diffused_heads train --data clips/ --init-from ./diffused-heads-crema --output-dir tuned

The objective is the original one: L_simple (MSE on the noise) + 1e-4 · L_vlb (the variational bound term of
the sampled timestep, which trains the learned variance; the predicted noise is detached in it) + 0.2 · lip
loss (MSE on the noise inside the mouth box, when boxes are given). The target frame is a random frame of a
random clip; its motion frames are the clip's two previous ground-truth frames (the identity frame before the
start); the identity frame is another random frame of the same clip. The audio encoder is frozen by default,
as in the original; `--train-audio-encoder` trains it jointly (needed for a model made from scratch).

A clip is `NAME.mp4` (or any video PyAV reads) with its audio track or a `NAME.wav` beside it, and optionally
`NAME.json` with `"mouth_boxes"`: one `[x0, y0, x1, y1]` box in pixels of the video frame per frame (what
`diffused-heads make-dataset` writes). All clips are decoded once and held in memory at the model's resolution.

Checkpoints (`--checkpoint-every`, in `--checkpoint-dir`) hold the model, optimiser, EMA, learning-rate and
random states; `--resume latest` continues a run exactly where it stopped. Losses are logged to
`train_log.jsonl` in the checkpoint folder. At the end the pipeline (EMA weights where EMA is on) is saved
with `save_pretrained` to `--output-dir`, ready for `DiffusedHeadsPipeline.from_pretrained`.
"""

import argparse
import glob
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from .cli_utils import HelpFormatter
from .hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
from .hub.pipeline_diffused_heads import (
    ORIGINAL_SCHEDULER_CONFIG,
    DiffusedHeadsPipeline,
    audio_window,
    to_motion_frame,
)
from .hub.unet.unet_diffused_heads import NUM_MOTION_FRAMES, DiffusedHeadsUNetModel
from .media import FPS, VIDEO_EXTENSIONS, MediaError, load_audio, read_video

logger = logging.getLogger(__name__)

# Configurations a model can be made from. "crema" is the released model's; "builtin" is the small model
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


class TrainingError(Exception):
    """A problem with the training inputs, reported as one line."""


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class Clip:
    name: str
    frames: torch.Tensor  # (num_frames, 3, S, S) uint8
    waveform: torch.Tensor  # (num_samples,) float32 at the encoder's rate
    mouth_boxes: Optional[torch.Tensor]  # (num_frames, 4) float, fractions of the size: x0, y0, x1, y1


def decode_video(path: str, size: int) -> torch.Tensor:
    """All frames of a video as `(F, 3, size, size)` uint8, centre-cropped to a square and resized."""
    try:
        return torch.from_numpy(read_video(path, size)).permute(0, 3, 1, 2).contiguous()
    except MediaError as error:
        raise TrainingError(str(error)) from None


def load_clips(folder: str, size: int, encoder: DiffusedHeadsAudioEncoder) -> List[Clip]:
    """Every clip of `folder`, decoded at `size`×`size`, cut to the frames its audio covers."""
    if not os.path.isdir(folder):
        raise TrainingError(f"the data folder {folder} does not exist")
    paths = sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS
    )
    if not paths:
        raise TrainingError(f"no video clips ({', '.join(sorted(VIDEO_EXTENSIONS))}) in {folder}")
    rate = encoder.config.sampling_rate
    clips = []
    for path in paths:
        stem = os.path.splitext(path)[0]
        frames = decode_video(path, size)
        audio_path = stem + ".wav" if os.path.exists(stem + ".wav") else path
        try:
            waveform = load_audio(audio_path, sampling_rate=rate)
        except MediaError as error:
            raise TrainingError(str(error)) from None
        num_frames = min(len(frames), encoder.num_frames(len(waveform)))
        if num_frames < 2:
            logger.warning(f"skipping {path}: shorter than two frames")
            continue
        waveform = waveform[: num_frames * rate // FPS]
        boxes = None
        if os.path.exists(stem + ".json"):
            with open(stem + ".json", encoding="utf-8") as f:
                info = json.load(f)
            if "mouth_boxes" in info:
                boxes = torch.tensor(info["mouth_boxes"], dtype=torch.float32)
                source_size = float(info.get("size", 0) or 0)
                if source_size <= 0:
                    raise TrainingError(f"{stem}.json gives mouth_boxes but no frame 'size' in pixels")
                if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) < num_frames:
                    raise TrainingError(f"{stem}.json: mouth_boxes must be one [x0, y0, x1, y1] per frame")
                boxes = boxes[:num_frames] / source_size
        clips.append(Clip(os.path.basename(stem), frames[:num_frames], torch.from_numpy(waveform), boxes))
    if not clips:
        raise TrainingError(f"no usable clips in {folder}")
    return clips


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


class DiffusionObjective:
    """The training loss of a UNet with learned-range variance, on a scheduler's schedule.

    The first `channels` outputs predict the noise (`prediction_type="epsilon"`, the original) or the velocity
    v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x_0 (`"v_prediction"`); L_simple and the lip loss are
    the MSE on that target, and L_vlb uses the noise implied by it.
    """

    def __init__(self, scheduler, vlb_weight: float = 1e-4, lip_weight: float = 0.2, prediction_type=None):
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        # Cumulative products in float64: 1 - alpha_bar near t = 0 loses most of its digits in float32.
        betas = scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        self.num_train_timesteps = len(betas)
        # Tables stay in float64 and are cast to the dtype of the tensors they meet.
        self.alphas_cumprod = alphas_cumprod
        self.log_betas = torch.log(betas)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        self.posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_x0 = betas * previous.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_xt = (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.vlb_weight = vlb_weight
        self.lip_weight = lip_weight

    def _at(self, values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values[timesteps.cpu()].to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x_start, noise, timesteps):
        alpha_bar = self._at(self.alphas_cumprod, timesteps, x_start)
        return alpha_bar.sqrt() * x_start + (1.0 - alpha_bar).sqrt() * noise

    def target(self, x_start, noise, timesteps):
        """What the first output channels are trained to predict."""
        if self.prediction_type == "epsilon":
            return noise
        alpha_bar = self._at(self.alphas_cumprod, timesteps, x_start)
        return alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * x_start

    def predicted_noise(self, prediction, x_t, timesteps):
        if self.prediction_type == "epsilon":
            return prediction
        alpha_bar = self._at(self.alphas_cumprod, timesteps, x_t)
        return alpha_bar.sqrt() * prediction + (1.0 - alpha_bar).sqrt() * x_t

    def vlb_terms(self, model_output, x_start, x_t, timesteps):
        """The bound term L_{t-1} of every sample, in bits per dimension, with the predicted noise detached:
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder's -log p(x_0 | x_1) for t = 0."""
        channels = x_start.shape[1]
        eps = self.predicted_noise(model_output[:, :channels].detach(), x_t, timesteps)
        var_values = model_output[:, channels:]
        alpha_bar = self._at(self.alphas_cumprod, timesteps, x_t)
        pred_x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        coef_x0 = self._at(self.posterior_mean_x0, timesteps, x_t)
        coef_xt = self._at(self.posterior_mean_xt, timesteps, x_t)
        model_mean = coef_x0 * pred_x0 + coef_xt * x_t
        true_mean = coef_x0 * x_start + coef_xt * x_t
        min_log = self._at(self.posterior_log_variance, timesteps, x_t)
        max_log = self._at(self.log_betas, timesteps, x_t)
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
        loss = losses["simple"]
        if model_output.shape[1] > channels:
            losses["vlb"] = self.vlb_terms(model_output.float(), x_start.float(), x_t.float(), timesteps).mean()
            loss = loss + self.vlb_weight * losses["vlb"]
        if mouth_mask is not None and self.lip_weight:
            mask = mouth_mask.to(squared.dtype)
            per_sample = (squared * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * channels).clamp(min=1.0)
            losses["lip"] = per_sample.mean()
            loss = loss + self.lip_weight * losses["lip"]
        losses["loss"] = loss
        return losses


# --------------------------------------------------------------------------------------------------
# Batches


def mouth_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes in fractions of the size, widened by the lip-box margin, to (B, 1, size, size) masks."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x0, y0, x1, y1 = (boxes - torch.tensor([LIP_BOX_MARGIN, LIP_BOX_MARGIN, -LIP_BOX_MARGIN, -LIP_BOX_MARGIN])).unbind(
        1
    )
    inside_x = (coords[None] >= x0[:, None]) & (coords[None] <= x1[:, None])
    inside_y = (coords[None] >= y0[:, None]) & (coords[None] <= y1[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None].float()


def sample_batch(clips: List[Clip], batch_size: int, generator: torch.Generator, motion_dropout: float = 0.0):
    """Pick (clip, target frame, identity frame) triples and gather the frames of a training batch."""
    picks = torch.randint(len(clips), (batch_size,), generator=generator).tolist()
    batch = {"clip": [], "target": [], "x_start": [], "identity": [], "motion": [], "boxes": []}
    for index in picks:
        clip = clips[index]
        count = len(clip.frames)
        target = int(torch.randint(count, (1,), generator=generator))
        identity_index = int(torch.randint(count, (1,), generator=generator))
        dropped = motion_dropout > 0 and float(torch.rand(1, generator=generator)) < motion_dropout
        identity = clip.frames[identity_index]
        motion = []
        for back in range(NUM_MOTION_FRAMES, 0, -1):  # oldest first
            source = target - back
            motion.append(identity if dropped or source < 0 else clip.frames[source])
        batch["clip"].append(index)
        batch["target"].append(target)
        batch["x_start"].append(clip.frames[target])
        batch["identity"].append(identity)
        batch["motion"].append(torch.stack(motion))
        batch["boxes"].append(clip.mouth_boxes[target] if clip.mouth_boxes is not None else None)
    to_unit = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
    batch["x_start"] = to_unit(torch.stack(batch["x_start"]))
    batch["identity"] = to_unit(torch.stack(batch["identity"]))
    batch["motion"] = to_unit(torch.stack(batch["motion"]))  # (B, 2, 3, S, S)
    batch["boxes"] = torch.stack(batch["boxes"]) if all(b is not None for b in batch["boxes"]) else None
    return batch


# --------------------------------------------------------------------------------------------------
# Training


class TrainingState:
    """Step counter and the batch generator's state, saved with every checkpoint."""

    def __init__(self, seed: int):
        self.step = 0
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="diffused-heads train",
        description="Train the Diffused Heads UNet on talking-face clips (see the module docstring).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder of clips: NAME.mp4 [+ NAME.wav] [+ NAME.json mouth boxes]")
    p.add_argument("--output-dir", required=True, help="where the trained pipeline is saved (save_pretrained)")
    p.add_argument("--checkpoint-dir", help="checkpoints and train_log.jsonl (default: OUTPUT_DIR-checkpoints)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--init-from", help="a saved pipeline folder to start from (e.g. the converted CREMA model)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="builtin", help="configuration of a new model")
    model.add_argument("--config", help='JSON file {"unet": {...}, "audio_encoder": {...}} for a new model')
    p.add_argument("--train-audio-encoder", action="store_true", help="train the audio encoder jointly")
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        default="epsilon",
        help="what a new model predicts: the noise (the original) or v, which keeps the clean-frame estimate "
        "sound at high noise levels and trains faster (a model from --init-from keeps its own)",
    )
    p.add_argument(
        "--inference-steps",
        type=int,
        help="the saved model's own denoising steps per frame (default: the starting model's, else none: 100)",
    )
    p.add_argument(
        "--stabilize-every",
        type=int,
        metavar="N",
        help="the saved model's own stabilize_every (default: the starting model's, else none)",
    )
    p.add_argument(
        "--sampling-variance",
        choices=("learned_range", "fixed_small"),
        help="the variance the saved scheduler samples with: the learned one (the original) or the posterior "
        "variance (fixed_small), for a model whose learned variance is still poor (default: the starting model's, "
        "else learned_range)",
    )
    p.add_argument("--max-steps", type=int, default=3000, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=10, help="frames per step per process")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="Adam learning rate")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--vlb-weight", type=float, default=1e-4, help="weight of L_vlb")
    p.add_argument("--lip-loss-weight", type=float, default=0.2, help="weight of the lip loss (needs mouth boxes)")
    p.add_argument(
        "--motion-dropout",
        type=float,
        default=0.0,
        help="probability of replacing both motion frames by the identity frame (0 in the original)",
    )
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (0 turns it off)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    p.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate precision")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.inference_steps is not None and args.inference_steps < 1:
        p.error("--inference-steps must be at least 1")
    if args.stabilize_every is not None and args.stabilize_every < 0:
        p.error("--stabilize-every must be 0 (off) or more")
    if not 0.0 <= args.motion_dropout <= 1.0 or not 0.0 <= args.ema_decay < 1.0:
        p.error("--motion-dropout must be in [0, 1] and --ema-decay in [0, 1)")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = os.path.normpath(args.output_dir) + "-checkpoints"
    return args


def build_components(args):
    from diffusers import DDPMScheduler

    if args.init_from:
        local = os.path.isabs(args.init_from) or args.init_from.startswith(".") or os.path.exists(args.init_from)
        if local and not os.path.isdir(args.init_from):
            raise TrainingError(f"--init-from {args.init_from} could not be loaded: no such folder")
        try:
            pipe = DiffusedHeadsPipeline.from_pretrained(args.init_from)
        except (OSError, ValueError) as error:
            reason = " ".join(str(error).split())
            raise TrainingError(f"--init-from {args.init_from} could not be loaded: {reason}") from None
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        defaults = {name: pipe.config.get(name) for name in MODEL_DEFAULTS}
        return pipe.unet, pipe.audio_encoder, scheduler, defaults
    if not args.train_audio_encoder:
        raise TrainingError(
            "a new model has an untrained audio encoder: pass --train-audio-encoder, or --init-from a pipeline "
            "whose encoder is trained"
        )
    preset = PRESETS[args.preset]
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                preset = json.load(f)
        except (OSError, ValueError) as error:
            raise TrainingError(f"--config {args.config} could not be read: {error}") from None
        if not isinstance(preset, dict) or set(preset) - {"unet", "audio_encoder"}:
            raise TrainingError('--config must hold a JSON object with the keys "unet" and "audio_encoder"')
    torch.manual_seed(args.seed)
    try:
        unet = DiffusedHeadsUNetModel(**preset.get("unet", {}))
        encoder = DiffusedHeadsAudioEncoder(**preset.get("audio_encoder", {}))
    except (TypeError, ValueError) as error:
        raise TrainingError(f"invalid model configuration: {error}") from None
    scheduler = DDPMScheduler(**{**ORIGINAL_SCHEDULER_CONFIG, "prediction_type": args.prediction_type})
    return unet, encoder, scheduler, {}


# The sampling defaults a saved model carries in its pipeline config.
MODEL_DEFAULTS = ("trained_clip_seconds", "stabilize_every", "num_inference_steps")


def pipeline_to_save(args, unet, encoder, noise_scheduler, defaults: dict, longest_clip: float):
    """The trained pipeline as it is saved: its components, the scheduler it samples with and the model's own
    defaults (from the options, else from the starting model)."""
    from diffusers import DDPMScheduler

    variance = args.sampling_variance or noise_scheduler.config.variance_type
    return DiffusedHeadsPipeline(
        unet=unet,
        audio_encoder=encoder,
        scheduler=DDPMScheduler.from_config(noise_scheduler.config, variance_type=variance),
        # The saved model warns about audio longer than what it has seen (or than its starting point had seen).
        trained_clip_seconds=round(max(longest_clip, defaults.get("trained_clip_seconds") or 0.0), 2),
        stabilize_every=args.stabilize_every if args.stabilize_every is not None else defaults.get("stabilize_every"),
        num_inference_steps=args.inference_steps or defaults.get("num_inference_steps"),
    )


def _checkpoints(folder: str) -> List[str]:
    found = glob.glob(os.path.join(folder, "checkpoint-*"))
    return sorted((p for p in found if p.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[-1]))


def train(args) -> str:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    log = accelerator.print
    unet, encoder, noise_scheduler, defaults = build_components(args)
    if unet.config.audio_embedding_dim != encoder.config.hidden_size:
        raise TrainingError("the UNet's audio_embedding_dim differs from the audio encoder's hidden_size")
    if unet.config.out_channels not in (unet.config.in_channels, 2 * unet.config.in_channels):
        raise TrainingError("out_channels must be in_channels (noise only) or twice that (noise and variance)")
    size, context = unet.config.sample_size, unet.config.audio_context
    clips = load_clips(args.data, size, encoder)
    num_frames = sum(len(c.frames) for c in clips)
    with_boxes = sum(c.mouth_boxes is not None for c in clips)
    log(f"{len(clips)} clips, {num_frames} frames ({num_frames / FPS / 60:.1f} min), {with_boxes} with mouth boxes")
    longest_clip = max(len(c.frames) for c in clips) / FPS
    if args.lip_loss_weight and 0 < with_boxes < len(clips):
        raise TrainingError("some clips have mouth boxes and some do not; give boxes for all or none")

    objective = DiffusionObjective(noise_scheduler, vlb_weight=args.vlb_weight, lip_weight=args.lip_loss_weight)
    encoder.requires_grad_(args.train_audio_encoder)
    parameters = list(unet.parameters()) + (list(encoder.parameters()) if args.train_audio_encoder else [])
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_steps
    )
    state = TrainingState(args.seed + accelerator.process_index)
    ema_unet = ema_encoder = None
    if args.ema_decay:
        ema_unet = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True)
        accelerator.register_for_checkpointing(ema_unet)
        if args.train_audio_encoder:
            ema_encoder = EMAModel(encoder.parameters(), decay=args.ema_decay, use_ema_warmup=True)
            accelerator.register_for_checkpointing(ema_encoder)
    accelerator.register_for_checkpointing(state)
    if args.train_audio_encoder:
        unet, encoder, optimizer, lr_scheduler = accelerator.prepare(unet, encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        encoder.to(accelerator.device).eval()
    device = accelerator.device

    if args.resume:
        path = args.resume
        if path == "latest":
            found = _checkpoints(args.checkpoint_dir)
            if not found:
                raise TrainingError(f"--resume latest: no checkpoint in {args.checkpoint_dir}")
            path = found[-1]
        if not os.path.isdir(path):
            raise TrainingError(f"--resume: {path} is not a checkpoint folder")
        accelerator.load_state(path)
        log(f"resumed from {path} at step {state.step}")
        if ema_unet is not None:
            ema_unet.to(device)
        if ema_encoder is not None:
            ema_encoder.to(device)

    frozen_embeddings = None
    if not args.train_audio_encoder:
        with torch.no_grad():
            frozen_embeddings = [encoder(c.waveform[None].to(device)).audio_embeddings[0].cpu() for c in clips]

    os.makedirs(args.checkpoint_dir, exist_ok=True)
    log_path = os.path.join(args.checkpoint_dir, "train_log.jsonl")
    motion_channels = accelerator.unwrap_model(unet).config.motion_frame_channels
    unet.train()
    encoder.train(args.train_audio_encoder)
    progress = tqdm(total=args.max_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    started, running = time.time(), {}
    while state.step < args.max_steps:
        batch = sample_batch(clips, args.batch_size, state.generator, args.motion_dropout)
        x_start = batch["x_start"].to(device)
        identity = batch["identity"].to(device)
        motion = batch["motion"].to(device)
        motion = torch.cat([to_motion_frame(motion[:, k], motion_channels) for k in range(NUM_MOTION_FRAMES)], 1)
        if args.train_audio_encoder:  # one encoder pass per distinct clip of the batch
            embeddings = {
                index: encoder(clips[index].waveform[None].to(device)).audio_embeddings[0]
                for index in sorted(set(batch["clip"]))
            }
        else:
            embeddings = frozen_embeddings
        audio = torch.stack(
            [audio_window(embeddings[c], t, context) for c, t in zip(batch["clip"], batch["target"])]
        ).to(device)
        noise = torch.randn(x_start.shape, generator=state.generator).to(device)
        timesteps = torch.randint(objective.num_train_timesteps, (len(x_start),), generator=state.generator).to(device)
        x_t = objective.add_noise(x_start, noise, timesteps)
        mask = mouth_masks(batch["boxes"], size).to(device) if batch["boxes"] is not None else None

        with accelerator.autocast():
            output = unet(x_t, timesteps, identity, motion, audio).sample
        losses = objective(output, noise, x_start, x_t, timesteps, mask)
        if not torch.isfinite(losses["loss"]):
            raise TrainingError(f"the loss became {losses['loss'].item()} at step {state.step}")
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema_unet is not None:
            ema_unet.step(unet.parameters())
        if ema_encoder is not None:
            ema_encoder.step(encoder.parameters())
        state.step += 1
        progress.update()

        for key, value in losses.items():
            running.setdefault(key, []).append(float(value.detach()))
        if state.step % args.log_every == 0 or state.step == args.max_steps:
            record = {"step": state.step, **{k: float(np.mean(v)) for k, v in running.items()}}
            record.update(lr=lr_scheduler.get_last_lr()[0], elapsed_s=round(time.time() - started, 1))
            running = {}
            progress.set_postfix(loss=f"{record['loss']:.4f}", simple=f"{record['simple']:.4f}")
            if accelerator.is_main_process:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        if state.step % args.checkpoint_every == 0 or state.step == args.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                accelerator.save_state(os.path.join(args.checkpoint_dir, f"checkpoint-{state.step}"))
                for old in _checkpoints(args.checkpoint_dir)[: -args.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet).eval()
        encoder = accelerator.unwrap_model(encoder).eval()
        if ema_unet is not None:
            ema_unet.copy_to(unet.parameters())
        if ema_encoder is not None:
            ema_encoder.copy_to(encoder.parameters())
        unet.requires_grad_(False)
        encoder.requires_grad_(False)
        pipe = pipeline_to_save(args, unet.to("cpu"), encoder.to("cpu"), noise_scheduler, defaults, longest_clip)
        pipe.save_pretrained(args.output_dir)
        log(f"saved the pipeline to {args.output_dir} after {state.step} steps ({time.time() - started:.0f} s)")
    accelerator.end_training()
    return args.output_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
