"""Train the Diffused Heads UNet (and optionally the audio encoder), or fine-tune a converted model.

    diffused-heads prepare-dataset raw_videos/ data/
    diffused-heads train --data data/ --init-from ./diffused-heads-crema --output-dir tuned --train-layers decoder
    accelerate launch -m diffused_heads train --data data/ --init-from ./diffused-heads-crema --output-dir tuned

The objective is the original one: L_simple (MSE on the noise) + 1e-4 · L_vlb (the variational bound term of
the sampled timestep, which trains the learned variance; the predicted noise is detached in it) + 0.2 · lip
loss (MSE on the noise inside the mouth box, when boxes are given). The target frame is a random frame of a
random clip; its motion frames are the clip's two previous ground-truth frames (the identity frame before the
start); the identity frame is another random frame of the same clip. The audio encoder is frozen by default,
as in the original; `--train-audio-encoder` trains it jointly (needed for a model made from scratch).

The data is a prepared dataset (`dataset`: `.npy` clips and a manifest, what `prepare-dataset` writes; its
`--split`), read a few frames at a time by DataLoader workers, so memory does not grow with the number of
clips. A folder of ready clips (`NAME.mp4` with its audio or a `NAME.wav`, optionally `NAME.json` with
`"mouth_boxes"` and the frame `"size"`: what `make-dataset` writes) is stored once as a prepared dataset in
the checkpoint folder. A frozen encoder's audio embeddings are computed once per clip and kept on disk there.

Checkpoints (`--checkpoint-every`, in `--checkpoint-dir`) hold the model, optimiser, EMA, learning-rate and
step; every step's random numbers follow from the seed, the process and the step, so `--resume latest`
continues a run exactly where it stopped. Losses are logged to `train_log.jsonl` in the checkpoint folder. At
the end the pipeline (EMA weights where EMA is on) is saved with `save_pretrained` to `--output-dir`, ready for
`DiffusedHeadsPipeline.from_pretrained`.
"""

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from .cli_utils import HelpFormatter
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
from .media import FPS, resize_frames

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
    `plan_batch`); the sample holds the target frame, its two motion frames (the clip's previous frames, the
    identity frame before the start), the identity frame, the mouth box and either the audio window of the
    target frame (from embeddings precomputed on disk) or the clip's waveform (when the encoder trains)."""

    def __init__(self, data: PreparedDataset, size: int, context: int, embeddings: Optional[str] = None):
        self.data, self.size, self.context, self.embeddings = data, size, context, embeddings

    def __len__(self) -> int:
        return self.data.num_frames

    def __getitem__(self, plan) -> dict:
        index, target, identity_index, dropped = plan
        clip = self.data.clips[index]
        first = max(0, target - NUM_MOTION_FRAMES)
        stacked = np.concatenate(
            [self.data.frames(clip, first, target - first + 1), self.data.frame(clip, identity_index)[None]]
        )
        frames = torch.from_numpy(resize_frames(stacked, self.size)).permute(0, 3, 1, 2)
        recent, identity = frames[:-1], frames[-1]
        motion = []
        for back in range(NUM_MOTION_FRAMES, 0, -1):  # oldest first
            source = target - back
            motion.append(identity if dropped or source < 0 else recent[source - first])
        sample = {
            "clip": index,
            "target": target,
            "x_start": recent[target - first],
            "identity": identity,
            "motion": torch.stack(motion),
            "boxes": None,
        }
        boxes = self.data.mouth_boxes(clip)
        if boxes is not None:
            sample["boxes"] = torch.from_numpy(boxes[target] / self.data.size)
        if self.embeddings is not None:
            embeddings = torch.from_numpy(np.load(os.path.join(self.embeddings, clip.id + ".npy")))
            sample["audio"] = audio_window(embeddings, target, self.context)
        else:
            sample["waveform"] = torch.from_numpy(self.data.audio(clip))
        return sample


def collate_samples(samples: List[dict]) -> dict:
    to_unit = lambda x: x.float() / 127.5 - 1.0  # noqa: E731
    batch = {
        "clip": [s["clip"] for s in samples],
        "target": [s["target"] for s in samples],
        "x_start": to_unit(torch.stack([s["x_start"] for s in samples])),
        "identity": to_unit(torch.stack([s["identity"] for s in samples])),
        "motion": to_unit(torch.stack([s["motion"] for s in samples])),  # (B, 2, 3, S, S)
        "boxes": torch.stack([s["boxes"] for s in samples]) if all(s["boxes"] is not None for s in samples) else None,
    }
    if "audio" in samples[0]:
        batch["audio"] = torch.stack([s["audio"] for s in samples])
    else:
        batch["waveforms"] = [s["waveform"] for s in samples]
    return batch


def open_data(args, size: int, is_main: bool, wait) -> PreparedDataset:
    """The training data: a prepared dataset (its `--split`), or a folder of ready clips, which is written as a
    prepared dataset into the checkpoint folder once (then read from there)."""
    folder = args.data
    if not os.path.isdir(folder):
        raise TrainingError(f"the data folder {folder} does not exist")
    if not is_prepared(folder):
        converted = os.path.join(args.checkpoint_dir, "data")
        if is_main:
            if not is_prepared(converted) or PreparedDataset(converted).manifest.get(
                "prepared_from"
            ) != os.path.abspath(folder):
                logger.info(f"{folder} holds ready clips: storing them as a prepared dataset in {converted}")
                try:
                    convert_clip_folder(folder, converted, size)
                except MediaError as error:
                    raise TrainingError(str(error)) from None
        wait()
        folder = converted
    try:
        data = PreparedDataset(folder, None if args.split == "all" else args.split)
        for clip in data.clips:
            data.check(clip)
    except MediaError as error:
        raise TrainingError(str(error)) from None
    data.clips = [c for c in data.clips if c.frames >= 2]
    if not data.clips:
        raise TrainingError(
            f"no usable clips in {args.data}" + (f" (split {args.split})" if args.split != "all" else "")
        )
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


# --------------------------------------------------------------------------------------------------
# Training


class TrainingState:
    """The step counter, saved with every checkpoint (each step's random numbers follow from it)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="diffused-heads train",
        description="Train the Diffused Heads UNet on talking-face clips (see the module docstring).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="a prepared dataset (prepare-dataset), or a folder of ready clips: NAME.mp4 [+ NAME.wav] [+ NAME.json "
        "mouth boxes], stored once as a prepared dataset in the checkpoint folder",
    )
    p.add_argument(
        "--split", choices=("train", "test", "all"), default="train", help="which clips of a prepared dataset to use"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=min(4, max(1, (os.cpu_count() or 2) // 2)),
        help="DataLoader worker processes that read the frames (0: read in the training process)",
    )
    p.add_argument("--output-dir", required=True, help="where the trained pipeline is saved (save_pretrained)")
    p.add_argument("--checkpoint-dir", help="checkpoints and train_log.jsonl (default: OUTPUT_DIR-checkpoints)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--init-from", help="a saved pipeline folder to start from (e.g. the converted CREMA model)")
    model.add_argument("--preset", choices=sorted(PRESETS), default="builtin", help="configuration of a new model")
    model.add_argument("--config", help='JSON file {"unet": {...}, "audio_encoder": {...}} for a new model')
    p.add_argument("--train-audio-encoder", action="store_true", help="train the audio encoder jointly")
    p.add_argument(
        "--train-layers",
        choices=("all", "decoder"),
        default="all",
        help="the UNet layers that train: all, or only the decoder half (up blocks and output layers), which "
        "adapts a converted model to new faces and backgrounds with less data",
    )
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
    if args.num_workers < 0:
        p.error("--num-workers must be 0 or more")
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


def checkpoint_to_resume(args) -> Optional[str]:
    if not args.resume:
        return None
    path = args.resume
    if path == "latest":
        found = _checkpoints(args.checkpoint_dir)
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint in {args.checkpoint_dir}")
        path = found[-1]
    if not os.path.isdir(path):
        raise TrainingError(f"--resume: {path} is not a checkpoint folder")
    return path


def train(args) -> str:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    # Without a GPU the processes of `accelerate launch` talk over gloo (accelerate's multi-CPU mode).
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    log = accelerator.print
    unet, encoder, noise_scheduler, defaults = build_components(args)
    if unet.config.audio_embedding_dim != encoder.config.hidden_size:
        raise TrainingError("the UNet's audio_embedding_dim differs from the audio encoder's hidden_size")
    if unet.config.out_channels not in (unet.config.in_channels, 2 * unet.config.in_channels):
        raise TrainingError("out_channels must be in_channels (noise only) or twice that (noise and variance)")
    size, context = unet.config.sample_size, unet.config.audio_context
    resume_from = checkpoint_to_resume(args)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    data = open_data(args, size, accelerator.is_main_process, accelerator.wait_for_everyone)
    frame_counts = [c.frames for c in data.clips]
    with_boxes = sum(data.has_mouth_boxes(c) for c in data.clips)
    log(
        f"{len(data.clips)} clips, {sum(frame_counts)} frames ({sum(frame_counts) / FPS / 60:.1f} min), "
        f"{with_boxes} with mouth boxes"
    )
    longest_clip = max(frame_counts) / FPS
    if args.lip_loss_weight and 0 < with_boxes < len(data.clips):
        raise TrainingError("some clips have mouth boxes and some do not; give boxes for all or none")

    objective = DiffusionObjective(noise_scheduler, vlb_weight=args.vlb_weight, lip_weight=args.lip_loss_weight)
    encoder.requires_grad_(args.train_audio_encoder)
    unet.requires_grad_(True)
    if args.train_layers == "decoder":
        unet.requires_grad_(False)
        for name in ("up_blocks", "conv_norm_out", "conv_out"):
            getattr(unet, name).requires_grad_(True)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    parameters += list(encoder.parameters()) if args.train_audio_encoder else []
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_steps
    )
    state = TrainingState()
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

    if resume_from:
        accelerator.load_state(resume_from)
        log(f"resumed from {resume_from} at step {state.step}")
        if ema_unet is not None:
            ema_unet.to(device)
        if ema_encoder is not None:
            ema_encoder.to(device)

    frozen_folder = None
    if not args.train_audio_encoder:
        frozen_folder = embeddings_folder(encoder, os.path.join(args.checkpoint_dir, "audio-embeddings"))
        if accelerator.is_main_process:
            precompute_embeddings(encoder, data, frozen_folder, device)
        accelerator.wait_for_everyone()

    log_path = os.path.join(args.checkpoint_dir, "train_log.jsonl")
    motion_channels = accelerator.unwrap_model(unet).config.motion_frame_channels
    samples = TrainingFrames(data, size, context, frozen_folder)
    batches = StepBatches(
        frame_counts,
        args.batch_size,
        args.seed,
        accelerator.process_index,
        state.step,
        args.max_steps,
        args.motion_dropout,
    )
    # The loader draws its workers' seed from its own generator, not from the global one that dropout uses (whose
    # state a checkpoint restores).
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=batches,
        num_workers=args.num_workers,
        collate_fn=collate_samples,
        generator=torch.Generator().manual_seed(args.seed),
    )
    unet.train()
    encoder.train(args.train_audio_encoder)
    progress = tqdm(total=args.max_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    started, running = time.time(), {}
    for batch in loader:
        generator = step_generator(args.seed, accelerator.process_index, state.step, 1)
        x_start = batch["x_start"].to(device)
        identity = batch["identity"].to(device)
        motion = batch["motion"].to(device)
        motion = torch.cat([to_motion_frame(motion[:, k], motion_channels) for k in range(NUM_MOTION_FRAMES)], 1)
        if args.train_audio_encoder:  # one encoder pass per distinct clip of the batch
            waveforms = {c: w for c, w in zip(batch["clip"], batch["waveforms"])}
            embeddings = {c: encoder(w[None].to(device)).audio_embeddings[0] for c, w in sorted(waveforms.items())}
            audio = torch.stack(
                [audio_window(embeddings[c], t, context) for c, t in zip(batch["clip"], batch["target"])]
            )
        else:
            audio = batch["audio"].to(device)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        timesteps = torch.randint(objective.num_train_timesteps, (len(x_start),), generator=generator).to(device)
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
