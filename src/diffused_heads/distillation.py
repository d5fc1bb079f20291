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

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import ArgumentError
from .hub.pipeline_diffused_heads import DEFAULT_NUM_INFERENCE_STEPS, denoise_frame
from .hub.unet.unet_diffused_heads import NUM_MOTION_FRAMES
from .training import NoiseSchedule, TrainingError, add_lip_loss, lip_box_masks, load_model, motion_input

METHODS = ("consistency", "direct")

# LCM's scaling of the timestep in the boundary condition (c_skip is about 0 from t = 1 on).
TIMESTEP_SCALING = 10.0


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
        timestep_scaling=TIMESTEP_SCALING,
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
    against 31.4 dB at 999 and 499 (5 held-out clips; docs/distillation.md)."""
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


def boundary_scalings(sampler, timesteps: torch.Tensor, like: torch.Tensor):
    """The consistency function's `c_skip` and `c_out` (f(x, t) = c_skip * x + c_out * x0) at `timesteps`, by the
    student sampler's own `get_scalings_for_boundary_condition_discrete` (its `timestep_scaling`), shaped to
    `like`: 1 and 0 at t = 0 (and at -1, the clean end), about 0 and 1 from t = 1 on."""
    scaled = timesteps.to(device=like.device, dtype=like.dtype).clamp(min=0)
    c_skip, c_out = sampler.get_scalings_for_boundary_condition_discrete(scaled)
    shape = (-1, *([1] * (like.ndim - 1)))
    return c_skip.view(shape), c_out.view(shape)


def consistency_function(sampler, schedule: NoiseSchedule, output, x_t, timesteps):
    """f(x_t, t) = c_skip * x_t + c_out * x0, x0 the clean frame a prediction (the first output channels) implies."""
    c_skip, c_out = boundary_scalings(sampler, timesteps, x_t)
    return c_skip * x_t + c_out * schedule.predicted_clean(output, x_t, timesteps)


# --------------------------------------------------------------------------------------------------
# Sampling a batch of frames (the teacher's sampler, the student's, the rollouts)


class Conditioning:
    """What a frame is made from: identity frames `(B, 3, S, S)`, motion frames `(B, 2 * c, S, S)` (c = the UNet's
    motion-frame channels) and the audio window `(B, context, dim)`."""

    def __init__(self, identity: torch.Tensor, motion: torch.Tensor, audio: torch.Tensor):
        self.identity, self.motion, self.audio = identity, motion, audio


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
    """Frames `(B, 3, S, S)` made as the pipeline makes them (`denoise_frame`): noise drawn from `generator`, then
    `scheduler` (its own copy: its state is this call's) at `steps` steps (at `timesteps`, where given)."""
    scheduler = type(scheduler).from_config(scheduler.config)
    config = unet.config if hasattr(unet, "config") else unet.module.config
    shape = (len(cond.identity), config.in_channels, config.sample_size, config.sample_size)
    noise = randn_tensor(shape, generator=generator, device=cond.identity.device, dtype=torch.float32)
    return denoise_frame(unet, scheduler, noise, cond.identity, cond.motion, cond.audio, steps, timesteps, generator)


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
    """The MSE of the student's frames against the target (`"mse"`), with the lip term (`training.lip_loss`)."""
    squared = (prediction - target) ** 2
    losses = {"mse": squared.mean()}
    losses["loss"] = losses["mse"]
    return add_lip_loss(losses, squared, mouth_mask, lip_weight)


def consistency_losses(
    student,
    target_student,
    teacher,
    sampler,
    schedule: NoiseSchedule,
    x_start: torch.Tensor,
    cond: Conditioning,
    generator: torch.Generator,
    mouth_mask: Optional[torch.Tensor] = None,
    lip_weight: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Consistency distillation on one batch: f(x_t, t) of the student against f(x_s, s) of `target_student` (the
    EMA of the student's weights, no gradient), x_s one teacher DDIM step from x_t (`ddim_step`) to the previous
    point of the student `sampler`'s grid; at the grid's first point the target is the teacher's clean frame. (With
    the online student as its own target, the loss is smallest near f(x, t) = x, the student drifts there and its
    frames keep their noise.)"""
    channels = x_start.shape[1]
    grid = teacher_grid(sampler)
    picks = torch.randint(len(grid), (len(x_start),), generator=generator)
    t = grid[picks]
    s = t - (int(grid[0]) + 1)  # the grid's previous point; -1 at the clean end
    noise = randn_tensor(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
    t, s = t.to(x_start.device), s.to(x_start.device)
    x_t = schedule.add_noise(x_start, noise, t)
    with torch.no_grad():
        x_s, x0_teacher = ddim_step(schedule, run_unet(teacher, x_t, t, cond)[:, :channels], x_t, t, s)
        output = run_unet(target_student, x_s, s.clamp(min=0), cond)[:, :channels]
        target = consistency_function(sampler, schedule, output, x_s, s.clamp(min=0))
        target = torch.where((s < 0).view(-1, 1, 1, 1), x0_teacher, target)
    prediction = consistency_function(sampler, schedule, run_unet(student, x_t, t, cond)[:, :channels], x_t, t)
    return lip_weighted_mse(prediction, target, mouth_mask, lip_weight)


def ddim_step(schedule: NoiseSchedule, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
    """One deterministic DDIM step (eta 0) from `x_t` at `t` to `s` (-1: the clean frame) with the clean frame
    clipped to [-1, 1] as the teacher's sampler clips it, and the noise recomputed from the clipped frame as DDIM
    does: `(x_s, x0)`."""
    x0 = schedule.predicted_clean(output, x_t, t).clamp(-1.0, 1.0)
    eps = schedule.noise_of(x0, x_t, t)
    return schedule.add_noise(x0, eps, s), x0


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
    device = teacher_frames.device
    timesteps = student_sampler.timesteps.to(device)
    picks = torch.randint(len(timesteps), (len(teacher_frames),), generator=generator)
    x = randn_tensor(teacher_frames.shape, generator=generator, device=device, dtype=teacher_frames.dtype)
    t = timesteps[0].expand(len(x)).clone()
    with torch.no_grad():  # the student's own sampler up to each sample's step
        for index in range(1, int(picks.max()) + 1):
            c_skip, c_out = boundary_scalings(student_sampler, t, x)
            x0 = schedule.predicted_clean(run_unet(student, x, t, cond)[:, :channels], x, t)
            denoised = c_skip * x + c_out * x0.clamp(-1.0, 1.0)
            fresh = randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)
            later = (picks >= index).to(device)
            t_next = timesteps[index].expand(len(x))
            x = torch.where(later.view(-1, 1, 1, 1), schedule.add_noise(denoised, fresh, t_next), x)
            t = torch.where(later, t_next, t)
    prediction = consistency_function(student_sampler, schedule, run_unet(student, x, t, cond)[:, :channels], x, t)
    return lip_weighted_mse(prediction, teacher_frames, mouth_mask, lip_weight)


# --------------------------------------------------------------------------------------------------
# A training step


@dataclass
class DistillationSettings:
    """What a distillation's losses depend on besides the models: the method (`METHODS`), the lip loss's weight,
    and what the teacher's target frame in `"direct"` is conditioned on: the student's own rollout (`"rollout"`)
    or the clip's ground-truth frames (`"ground-truth"`)."""

    method: str = "direct"
    lip_weight: float = 0.0
    target_context: str = "rollout"


def batch_losses(settings: DistillationSettings, accelerator, teacher, teacher_steps: int, sampler, stabilize: bool):
    """The losses of a training batch (`training.training_loop`'s `losses_of_batch`): the student's rollout of the
    motion frames, then the chosen method's losses on the target frame. `teacher` is the teacher pipeline (its UNet
    and sampler at `teacher_steps`), `sampler` the student's (set to its timesteps); with `stabilize` the older
    motion frame is the identity, as the teacher samples with `stabilize_every` = 1."""
    schedule = NoiseSchedule(teacher.scheduler)
    config = teacher.unet.config
    motion_channels = config.motion_frame_channels

    def losses_of_batch(batch, generator, models):
        student = models["unet"]
        device = accelerator.device
        x_start = batch["x_start"].to(device)
        identity = batch["identity"].to(device)
        history = batch["motion"].to(device)
        audio = batch["audio"].to(device)
        if history.shape[1] > NUM_MOTION_FRAMES:
            motion = roll_out(student, sampler, identity, history, audio, generator, stabilize)
        else:
            motion = history

        def conditioning(pair):  # the target's conditioning, given its two motion frames and its own audio window
            older = identity if stabilize else pair[:, 0]
            return Conditioning(identity, motion_input(older, pair[:, 1], motion_channels), audio[:, -1])

        cond = conditioning(motion)
        mask = lip_box_masks(batch["boxes"], config.sample_size).to(device) if batch["boxes"] is not None else None
        with accelerator.autocast():
            if settings.method == "consistency":
                return consistency_losses(
                    student,
                    models["unet_target"],
                    teacher.unet,
                    sampler,
                    schedule,
                    x_start,
                    cond,
                    generator,
                    mask,
                    settings.lip_weight,
                )
            teacher_cond = cond
            if settings.target_context == "ground-truth":
                teacher_cond = conditioning(history[:, -NUM_MOTION_FRAMES:])
            target = sample_frames(teacher.unet, teacher.scheduler, teacher_steps, teacher_cond, generator)
            return direct_losses(
                student, sampler, schedule, target.clamp(-1.0, 1.0), cond, generator, mask, settings.lip_weight
            )

    return losses_of_batch


def load_teacher(
    model: Optional[str],
    student_steps: int,
    teacher_steps: Optional[int] = None,
    student_timesteps: Union[None, str, List[int]] = None,
):
    """The teacher pipeline of `model` (a folder, a Hub id or a built-in name; None: `builtin-ddpm`), checked: not
    a student itself, with more steps per frame than the student. Returns its name, the pipeline, its steps per
    frame (`teacher_steps`, else its own) and the student's timesteps: `student_timesteps` checked against the
    teacher's grid, the default ones when None, and None (the student sampler's own) for "even"."""
    from .runtime import resolve_model

    try:
        path = resolve_model(model or "builtin-ddpm")  # the default model is itself a student
    except ArgumentError as error:
        raise TrainingError(f"--model {error.detail}") from None
    teacher = load_model(path, "--model")
    if is_student(teacher.scheduler):
        raise TrainingError(
            f"--model {model} is already a distilled student ({type(teacher.scheduler).__name__}, "
            f"{teacher.config.get('num_inference_steps')} steps); distil its teacher instead"
        )
    teacher_steps = teacher_steps or teacher.config.get("num_inference_steps") or DEFAULT_NUM_INFERENCE_STEPS
    if student_steps >= teacher_steps:
        raise TrainingError(
            f"--student-steps {student_steps} must be fewer than the teacher's {teacher_steps} steps per frame"
        )
    timesteps = teacher.scheduler.config.num_train_timesteps
    if timesteps % teacher_steps:
        raise TrainingError(f"--teacher-steps {teacher_steps} must divide the {timesteps} training timesteps")
    if student_timesteps is None:
        student_timesteps = default_student_timesteps(timesteps, teacher_steps, student_steps)
    elif student_timesteps == "even":
        student_timesteps = None  # the student sampler's own
    else:
        grid = [int(t) for t in teacher_grid_of(timesteps, teacher_steps)]
        off = [t for t in student_timesteps if t not in grid]
        if off:
            raise TrainingError(
                f"--student-timesteps {off} are not on the teacher's grid of {teacher_steps} steps "
                f"({', '.join(str(t) for t in reversed(grid))})"
            )
    return path, teacher, teacher_steps, student_timesteps
