"""Distil a model into a few-step student: the same UNet making a frame in K denoising steps instead of N.

    diffused-heads distill --model TEACHER --data DATA --output-dir student [--student-steps 2] [--method direct]
    accelerate launch -m diffused_heads distill --model ./diffused-heads-crema --data prepared/ --output-dir fast

DATA is a prepared dataset (`prepare-dataset`) or a folder of ready clips (`make-dataset`), as for `train`. The
student starts from the teacher's weights and is trained by one of the methods of `distillation` (consistency
distillation, or direct distillation of the teacher's own sampler), with its own generated motion frames in the
context (`--rollout-frames`). The audio encoder is the teacher's, frozen (its embeddings are computed once and
kept in the checkpoint folder).

The result is an ordinary model folder: the teacher's UNet class with the student's weights, an `LCMScheduler`
config, `num_inference_steps` = K in `model_index.json` (so every command uses the student at its own steps), a
model card naming the teacher and the method, and `distillation.json` with the run's settings and its time.
Checkpoints and `--resume latest` work as in `train`.
"""

import argparse
import json
import os
import shutil
import sys

import torch

from .cards import student_model_card
from .cli_utils import HelpFormatter, add_training_options, check_training_options, run_command
from .distillation import (
    METHODS,
    DistillationSettings,
    batch_losses,
    load_teacher,
    student_scheduler,
)
from .hub.pipeline_diffused_heads import DiffusedHeadsPipeline, retrieve_timesteps
from .hub.unet.unet_diffused_heads import NUM_MOTION_FRAMES
from .media import FPS
from .training import (
    LoopSettings,
    TrainingError,
    TrainingFrames,
    TrainingState,
    checkpoint_to_resume,
    frozen_embeddings,
    make_accelerator,
    open_data,
    run_device,
    training_loop,
    write_sample_sheet,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="diffused-heads distill",
        description="Distil a model into a student that makes each frame in a few denoising steps (see the module "
        "docstring).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        help="the teacher: a model folder or Hub id (default: the built-in 10-step model, builtin-ddpm)",
    )
    add_training_options(p, max_steps=1000, batch_size=8, learning_rate=5e-5, ema_decay=0.99, checkpoint_every=250)
    p.add_argument("--method", choices=METHODS, default="direct", help="how the student learns (see the docstring)")
    p.add_argument("--student-steps", type=int, default=2, metavar="K", help="the student's denoising steps per frame")
    p.add_argument(
        "--teacher-steps",
        type=int,
        metavar="N",
        help="the teacher's steps per frame, whose grid the student's timesteps lie on (default: the teacher's own)",
    )
    p.add_argument(
        "--student-timesteps",
        metavar="T1,T2,...",
        help="the student's K timesteps, descending, on the teacher's grid, which it is trained and samples at "
        "(saved as the model's own `timesteps`); 'even': LCMScheduler's evenly spaced ones (999,499 for K = 2 on a "
        "10-step grid). Default: the grid's top, the grid point nearest a fifth of the training timesteps and any "
        "others evenly between (999,199 for K = 2)",
    )
    p.add_argument(
        "--rollout-frames",
        type=int,
        default=2,
        metavar="R",
        help="frames the student makes itself before each target, whose motion frames are then its own (0: "
        "ground-truth motion frames only)",
    )
    p.add_argument(
        "--target-context",
        choices=("rollout", "ground-truth"),
        default="rollout",
        help="direct: the motion frames the teacher makes its target frame from: the student's rolled-out frames "
        "(the target continues the student's own motion) or the clip's ground-truth frames (the student, given its "
        "own frames, learns to return to the clip's path)",
    )
    p.add_argument("--lip-loss-weight", type=float, default=0.0, help="extra weight of the error inside the mouth box")
    args = p.parse_args(argv)
    check_training_options(p, args)
    if args.student_steps < 1:
        p.error("--student-steps must be at least 1")
    if args.teacher_steps is not None and args.teacher_steps < 1:
        p.error("--teacher-steps must be at least 1")
    if args.rollout_frames < 0:
        p.error("--rollout-frames must be 0 or more")
    if args.target_context != "rollout" and args.method != "direct":
        p.error("--target-context is an option of --method direct")
    if args.student_timesteps not in (None, "even"):
        try:
            args.student_timesteps = [int(t) for t in args.student_timesteps.split(",")]
        except ValueError:
            p.error(f"--student-timesteps {args.student_timesteps!r} is not a comma-separated list of integers")
        if len(args.student_timesteps) != args.student_steps:
            p.error(
                f"--student-timesteps gives {len(args.student_timesteps)} timesteps for {args.student_steps} steps"
            )
        if any(a <= b for a, b in zip(args.student_timesteps, args.student_timesteps[1:])):
            p.error("--student-timesteps must be in descending order")
    return args


def distill(args) -> str:
    if os.path.exists(args.output_dir) and (not os.path.isdir(args.output_dir) or os.listdir(args.output_dir)):
        raise TrainingError(f"--output-dir {args.output_dir} exists already; remove it or choose another folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_name, teacher, teacher_steps, student_timesteps = load_teacher(
        args.model, args.student_steps, args.teacher_steps, args.student_timesteps
    )
    checkpoint_to_resume(args.resume, args.checkpoint_dir)  # a wrong --resume is said before the data is read
    accelerator = make_accelerator(args.mixed_precision, args.report_to, args.checkpoint_dir)
    unet, encoder = teacher.unet, teacher.audio_encoder
    config = unet.config
    history = NUM_MOTION_FRAMES + args.rollout_frames
    made_checkpoint_dir = not os.path.exists(args.checkpoint_dir)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    try:
        data = open_data(args.data, args.split, args.checkpoint_dir, config.sample_size, accelerator, history + 1)
    except TrainingError:
        if made_checkpoint_dir and accelerator.is_main_process:  # bad data leaves nothing behind
            shutil.rmtree(args.checkpoint_dir, ignore_errors=True)
        raise
    frame_counts = [c.frames for c in data.clips]
    accelerator.print(
        f"{len(data.clips)} clips, {sum(frame_counts)} frames ({sum(frame_counts) / FPS / 60:.1f} min); "
        f"distilling {teacher_steps} steps into {args.student_steps} ({args.method})"
    )
    stabilize = teacher.config.get("stabilize_every") == 1
    student_sampler = student_scheduler(teacher.scheduler.config, teacher_steps)
    retrieve_timesteps(student_sampler, args.student_steps, timesteps=student_timesteps)

    unet.to(accelerator.device).eval().requires_grad_(False)  # the teacher's UNet (teacher.unet)
    student = type(unet).from_config(config)
    student.load_state_dict(unet.state_dict())
    student.requires_grad_(True)
    encoder.to(accelerator.device).eval().requires_grad_(False)
    embeddings = frozen_embeddings(encoder, data, args.checkpoint_dir, accelerator)
    samples = TrainingFrames(data, config.sample_size, config.audio_context, embeddings, history=history)
    progress = TrainingState()
    trained = training_loop(
        LoopSettings.from_args(args),
        accelerator,
        {"unet": student},
        data,
        samples,
        batch_losses(
            DistillationSettings(args.method, args.lip_loss_weight, args.target_context),
            accelerator,
            teacher,
            teacher_steps,
            student_sampler,
            stabilize,
        ),
        description="distilling",
        ema_targets=args.method == "consistency",
        state=progress,
    )
    if accelerator.is_main_process:
        pipe = DiffusedHeadsPipeline(
            unet=trained["unet"].to("cpu"),
            audio_encoder=encoder.to("cpu"),
            scheduler=student_scheduler(teacher.scheduler.config, teacher_steps),
            trained_clip_seconds=teacher.config.get("trained_clip_seconds"),
            stabilize_every=teacher.config.get("stabilize_every"),
            num_inference_steps=args.student_steps,
            timesteps=student_timesteps,
        )
        os.makedirs(args.output_dir, exist_ok=True)
        samples = None
        if args.sample_frames:
            samples = write_sample_sheet(pipe.to(accelerator.device), data, args.output_dir, args.sample_frames)
        pipe.save_pretrained(args.output_dir)
        record = {
            "teacher": teacher_name,
            "teacher_steps": teacher_steps,
            "method": args.method,
            "student_steps": args.student_steps,
            "student_timesteps": [int(t) for t in student_sampler.timesteps],
            "rollout_frames": args.rollout_frames,
            "target_context": args.target_context,
            "steps": args.max_steps,
            "batch_size": args.batch_size,
            "processes": accelerator.num_processes,
            "learning_rate": args.learning_rate,
            "clips": len(data.clips),
            "minutes": sum(frame_counts) / FPS / 60,
            "seconds": round(progress.seconds, 1),  # of training steps, over every resumed run
            "device": run_device(accelerator),
        }
        with open(os.path.join(args.output_dir, "distillation.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(student_model_card(args.model, teacher, record, samples))
        accelerator.print(f"saved the {args.student_steps}-step student to {args.output_dir}")
    accelerator.end_training()
    return args.output_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: distill(args) and 0, interrupted="--resume latest continues from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
