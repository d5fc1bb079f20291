"""Few-step students of a Diffused Heads model: the student's sampler, the teacher's targets, the self-rollout of
the motion frames, and the losses of the two distillation methods.

A student is the teacher's UNet (same class, same configuration, started from the teacher's weights) trained to
make a frame in K denoising steps instead of the teacher's N. It samples with diffusers' `LCMScheduler`, the
multistep consistency sampler: at each of its K timesteps (on the teacher's own grid of N, e.g. 999 and 499 for K
= 2) the student predicts the clean frame, which is noised again to the next timestep; the last prediction is the
frame. Its output keeps the teacher's parameterisation (noise or v), so a student is an ordinary model folder that
`DiffusedHeadsPipeline` runs with its scheduler config.

Methods (`METHODS`), both on the same data and loop (`training.training_loop`):

- `"consistency"`: consistency distillation (Song et al. 2023; latent consistency models). A ground-truth frame is
  noised to a timestep t of the teacher's grid; the teacher takes one DDIM step from it to the grid's previous
  timestep s; the student's clean-frame estimate at t is pulled to its target network's (the EMA of its weights,
  no gradient) estimate at s, and at the grid's end to the teacher's clean frame. The student learns the
  teacher's deterministic (DDIM) path.
- `"direct"`: the student learns the frames of the teacher's own sampler (its scheduler at its N steps; for the
  built-in model DDPM with the posterior variance). For each sample the teacher makes the target frame from
  noise; the student gets the input its own sampler would give it at a random one of its K timesteps (pure noise
  at the first; its own earlier clean-frame estimate, noised again, at the later ones) and is trained to predict
  the teacher's frame (MSE). Since the teacher's sampler is random, the student learns the average of the frames
  it would draw for that conditioning, the MSE-optimal K-step estimate of its sampler.

Self-rollout: in both, the motion frames of the target are not (only) ground truth. The student first makes the
`rollout_frames` frames before the target itself (no gradient), each from the two before it, starting from the
clip's ground-truth frames, and the target is conditioned on what it made; in `direct` the teacher makes its
target frame from the same rolled-out context, so the student learns to recover from its own errors (as in
Self Forcing and CausVid) instead of only ever seeing ground-truth motion.
"""

import inspect
from typing import Dict, List, Optional

import torch

from .hub.pipeline_diffused_heads import scheduler_uses_variance, set_timesteps, to_motion_frame
from .hub.unet.unet_diffused_heads import NUM_MOTION_FRAMES

METHODS = ("consistency", "direct")


# --------------------------------------------------------------------------------------------------
# The student's sampler


def student_scheduler(teacher_config, teacher_steps: int):
    """The student's `LCMScheduler`: the teacher's noise schedule and parameterisation, its timesteps on the grid
    of the teacher's `teacher_steps` (LCM's `original_inference_steps`), the clean-frame estimate clipped to
    [-1, 1] as the teacher's DDPM clips it."""
    from diffusers import LCMScheduler

    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    for key in ("variance_type", "timestep_spacing", "rescale_betas_zero_snr"):
        config.pop(key, None)
    return LCMScheduler.from_config(
        config,
        original_inference_steps=teacher_steps,
        clip_sample=True,
        clip_sample_range=config.get("clip_sample_range", 1.0),
        timestep_scaling=10.0,
    )


def is_student(scheduler) -> bool:
    """Whether a model samples with a consistency sampler (a distilled student)."""
    return type(scheduler).__name__ in ("LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler")


def teacher_grid_of(num_train_timesteps: int, teacher_steps: int) -> torch.Tensor:
    """The timesteps of a grid of `teacher_steps`, ascending (`k - 1, 2k - 1, ..., T - 1` with `k` = T / N)."""
    k = num_train_timesteps // teacher_steps
    return torch.arange(1, teacher_steps + 1) * k - 1


def default_student_timesteps(num_train_timesteps: int, teacher_steps: int, student_steps: int) -> List[int]:
    """The student's K timesteps on the teacher's grid of N, descending: the first at the top (T - 1), the last at
    the grid point nearest T / 5, any others evenly between; 999 and 199 for K = 2 on a grid of 10 (or of 100).
    The last step then takes a lightly noised copy of the frame the first step made and has fine detail to
    restore; LCMScheduler's evenly spaced timesteps (999 and 499) noise it halfway and leave more to the last step.
    On the built-in model, 150 steps of `direct` distillation reached an identity PSNR of 33.9 dB at 999 and 199
    against 31.4 dB at 999 and 499 (5 held-out clips; README)."""
    grid = teacher_grid_of(num_train_timesteps, teacher_steps).tolist()
    if student_steps == 1:
        return [grid[-1]]
    below_top = grid[:-1]
    last = min(range(len(below_top)), key=lambda i: abs(below_top[i] - num_train_timesteps / 5))
    last = min(last, teacher_steps - student_steps)  # room for K distinct points
    picks = torch.linspace(teacher_steps - 1, last, student_steps).round().long().tolist()
    return [int(grid[i]) for i in picks]


def teacher_grid(scheduler) -> torch.Tensor:
    """The timesteps of the student sampler's grid (the teacher's), ascending."""
    return teacher_grid_of(scheduler.config.num_train_timesteps, scheduler.config.original_inference_steps)


class NoiseSchedule:
    """The teacher's alpha-bar table and its parameterisation, for the arithmetic of the losses (float64 tables,
    cast to the tensors they meet)."""

    def __init__(self, scheduler):
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at `timesteps` (1 where a timestep is negative: the clean end of the grid), shaped to `like`."""
        table = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
        values = table[timesteps.cpu().long()]  # -1 picks the appended 1
        return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x_start, noise, timesteps):
        alpha_bar = self.alpha_bar(timesteps, x_start)
        return alpha_bar.sqrt() * x_start + (1.0 - alpha_bar).sqrt() * noise

    def split(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor):
        """The clean frame and the noise that a prediction (the first channels of the UNet's output) implies."""
        alpha_bar = self.alpha_bar(timesteps, x_t)
        a, b = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        if self.prediction_type == "epsilon":
            x0 = (x_t - b * output) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_t - b * output
        else:
            x0 = output
        eps = (x_t - a * x0) / b.clamp(min=1e-8)
        return x0, eps


def boundary_scalings(timesteps: torch.Tensor, like: torch.Tensor, scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's `c_skip` and `c_out` at `timesteps` (the consistency function is `c_skip * x + c_out * x0`), shaped to
    `like`: 1 and 0 at t = 0, about 0 and 1 from t = 1 on."""
    scaled = timesteps.to(device=like.device, dtype=like.dtype).clamp(min=0) * scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    shape = (-1, *([1] * (like.ndim - 1)))
    return c_skip.view(shape), c_out.view(shape)


# --------------------------------------------------------------------------------------------------
# Sampling a batch of frames (the teacher's sampler, the student's, the rollouts)


class Conditioning:
    """What a frame is made from: identity frames `(B, 3, S, S)`, motion frames `(B, 2 * c, S, S)` (c = the UNet's
    motion-frame channels) and the audio window `(B, context, dim)`."""

    def __init__(self, identity: torch.Tensor, motion: torch.Tensor, audio: torch.Tensor):
        self.identity, self.motion, self.audio = identity, motion, audio


def motion_input(older: torch.Tensor, newer: torch.Tensor, channels: int) -> torch.Tensor:
    """Two frames `(B, 3, S, S)` in [-1, 1], oldest first, as the UNet's motion input."""
    return torch.cat([to_motion_frame(older, channels), to_motion_frame(newer, channels)], dim=1)


def run_unet(unet, x, timesteps, cond: Conditioning) -> torch.Tensor:
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(len(x))
    dtype = next(unet.parameters()).dtype
    output = unet(x.to(dtype), timesteps, cond.identity.to(dtype), cond.motion.to(dtype), cond.audio.to(dtype))
    return output.sample.float()


@torch.no_grad()
def sample_frames(
    unet, scheduler, steps: int, cond: Conditioning, generator: torch.Generator, timesteps=None
) -> torch.Tensor:
    """Frames `(B, 3, S, S)` made as the pipeline makes them: noise drawn from `generator`, then `scheduler` (its
    own copy: its state is this call's) at `steps` steps (at `timesteps`, where given), given the variance channels
    only where it uses them."""
    scheduler = type(scheduler).from_config(scheduler.config)
    config = unet.config if hasattr(unet, "config") else unet.module.config
    channels = config.in_channels
    shape = (len(cond.identity), channels, config.sample_size, config.sample_size)
    device = cond.identity.device
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    set_timesteps(scheduler, steps, timesteps, device)
    uses_variance = scheduler_uses_variance(scheduler)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        output = run_unet(unet, scheduler.scale_model_input(x, t), t, cond)
        if not uses_variance:
            output = output[:, :channels]
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def roll_out(
    student,
    sampler,
    identity: torch.Tensor,
    history: torch.Tensor,
    audio: torch.Tensor,
    generator: torch.Generator,
    stabilize: bool,
) -> torch.Tensor:
    """The two motion frames of the target `(B, 2, 3, S, S)` after the student has made the frames before it
    itself: `history` `(B, H, 3, S, S)` holds the H ground-truth frames before the target (oldest first) and
    `audio` `(B, H - 1, context, dim)` the audio windows of the last H - 2 of them and of the target; the first two
    frames start the rollout and the student makes the other H - 2, each from the two before it (the older one
    the identity frame where `stabilize`, as the model samples with `stabilize_every` = 1), at the timesteps its
    `sampler` is set to."""
    config = student.config if hasattr(student, "config") else student.module.config
    channels = config.motion_frame_channels
    timesteps = [int(t) for t in sampler.timesteps]
    frames = [history[:, 0], history[:, 1]]
    for index in range(history.shape[1] - NUM_MOTION_FRAMES):
        older = identity if stabilize else frames[-2]
        cond = Conditioning(identity, motion_input(older, frames[-1], channels), audio[:, index])
        frame = sample_frames(student, sampler, len(timesteps), cond, generator, timesteps)
        frames.append(frame.clamp(-1.0, 1.0))
    return torch.stack(frames[-2:], dim=1)


# --------------------------------------------------------------------------------------------------
# The losses


def lip_weighted_mse(prediction, target, mouth_mask: Optional[torch.Tensor], lip_weight: float):
    squared = (prediction - target) ** 2
    losses = {"mse": squared.mean()}
    loss = losses["mse"]
    if mouth_mask is not None and lip_weight:
        mask = mouth_mask.to(squared.dtype)
        per_sample = (squared * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * squared.shape[1]).clamp(min=1.0)
        losses["lip"] = per_sample.mean()
        loss = loss + lip_weight * losses["lip"]
    losses["loss"] = loss
    return losses


def consistency_losses(
    student,
    target_student,
    teacher,
    schedule: NoiseSchedule,
    grid: torch.Tensor,
    x_start: torch.Tensor,
    cond: Conditioning,
    generator: torch.Generator,
    mouth_mask: Optional[torch.Tensor] = None,
    lip_weight: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Consistency distillation on one batch: f(x_t, t) of the student against f(x_s, s) of `target_student` (the
    EMA of the student's weights, no gradient), x_s one teacher DDIM step from x_t; at the grid's first timestep the
    target is the teacher's clean frame. (With the online student as its own target, the loss is smallest near f(x,
    t) = x, the student drifts there and its frames keep their noise.)"""
    channels = x_start.shape[1]
    picks = torch.randint(len(grid), (len(x_start),), generator=generator)
    t = grid[picks]
    k = int(grid[0]) + 1
    s = t - k  # -1 at the clean end
    noise = torch.randn(x_start.shape, generator=generator).to(x_start.device)
    t, s = t.to(x_start.device), s.to(x_start.device)
    x_t = schedule.add_noise(x_start, noise, t)
    with torch.no_grad():
        x0_teacher, eps_teacher = schedule.split(run_unet(teacher, x_t, t, cond)[:, :channels], x_t, t)
        x0_teacher = x0_teacher.clamp(-1.0, 1.0)
        alpha_bar_s = schedule.alpha_bar(s, x_t)
        x_s = alpha_bar_s.sqrt() * x0_teacher + (1.0 - alpha_bar_s).sqrt() * eps_teacher
        x0_target, _ = schedule.split(
            run_unet(target_student, x_s, s.clamp(min=0), cond)[:, :channels], x_s, s.clamp(min=0)
        )
        c_skip_s, c_out_s = boundary_scalings(s, x_s)
        target = torch.where((s < 0).view(-1, 1, 1, 1), x0_teacher, c_skip_s * x_s + c_out_s * x0_target)
    x0_student, _ = schedule.split(run_unet(student, x_t, t, cond)[:, :channels], x_t, t)
    c_skip_t, c_out_t = boundary_scalings(t, x_t)
    return lip_weighted_mse(c_skip_t * x_t + c_out_t * x0_student, target, mouth_mask, lip_weight)


def direct_losses(
    student,
    student_sampler,
    schedule: NoiseSchedule,
    teacher_frames: torch.Tensor,
    cond: Conditioning,
    generator: torch.Generator,
    mouth_mask: Optional[torch.Tensor] = None,
    lip_weight: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Direct distillation on one batch: at a random one of the K timesteps its sampler `student_sampler` is set
    to, from the input that sampler gives it there, the student's clean-frame estimate against the teacher's frames
    `teacher_frames`."""
    channels = teacher_frames.shape[1]
    timesteps = student_sampler.timesteps.to(teacher_frames.device)
    picks = torch.randint(len(timesteps), (len(teacher_frames),), generator=generator)
    x = torch.randn(teacher_frames.shape, generator=generator).to(teacher_frames.device)
    t = timesteps[0].expand(len(x)).clone()
    with torch.no_grad():  # the student's own sampler up to each sample's step
        for index in range(1, int(picks.max()) + 1):
            x0, _ = schedule.split(run_unet(student, x, t, cond)[:, :channels], x, t)
            c_skip, c_out = boundary_scalings(t, x)
            denoised = c_skip * x + c_out * x0.clamp(-1.0, 1.0)
            fresh = torch.randn(x.shape, generator=generator).to(x.device)
            later = picks >= index
            t_next = timesteps[index].expand(len(x))
            x = torch.where(later.view(-1, 1, 1, 1), schedule.add_noise(denoised, fresh, t_next), x)
            t = torch.where(later, t_next, t)
    x0_student, _ = schedule.split(run_unet(student, x, t, cond)[:, :channels], x, t)
    c_skip, c_out = boundary_scalings(t, x)
    return lip_weighted_mse(c_skip * x + c_out * x0_student, teacher_frames, mouth_mask, lip_weight)
