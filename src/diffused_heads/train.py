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
import os
import sys

import torch

from . import training
from .cards import TrainingRun, trained_model_card
from .cli_utils import HelpFormatter, add_training_options, check_training_options, run_command
from .media import FPS
from .training import (
    PRESETS,
    DiffusionObjective,
    LoopSettings,
    ModelStart,
    TrainingError,
    TrainingFrames,
    TrainingState,
    build_components,
    check_components,
    checkpoint_to_resume,
    diffusion_losses,
    frozen_embeddings,
    make_accelerator,
    pipeline_to_save,
    run_device,
    training_loop,
    write_sample_sheet,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="diffused-heads train",
        description="Train the Diffused Heads UNet on talking-face clips (see the module docstring).",
        formatter_class=HelpFormatter,
    )
    add_training_options(p)
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
    p.add_argument("--vlb-weight", type=float, default=1e-4, help="weight of L_vlb")
    p.add_argument("--lip-loss-weight", type=float, default=0.2, help="weight of the lip loss (needs mouth boxes)")
    p.add_argument(
        "--motion-dropout",
        type=float,
        default=0.0,
        help="probability of replacing both motion frames by the identity frame (0 in the original)",
    )
    args = p.parse_args(argv)
    check_training_options(p, args)
    if args.inference_steps is not None and args.inference_steps < 1:
        p.error("--inference-steps must be at least 1")
    if args.stabilize_every is not None and args.stabilize_every < 0:
        p.error("--stabilize-every must be 0 (off) or more")
    if not 0.0 <= args.motion_dropout <= 1.0:
        p.error("--motion-dropout must be in [0, 1]")
    return args


def train(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args.mixed_precision, args.report_to, args.checkpoint_dir)
    start = ModelStart(
        init_from=args.init_from,
        preset=args.preset,
        config=args.config,
        prediction_type=args.prediction_type,
        seed=args.seed,
        train_audio_encoder=args.train_audio_encoder,
    )
    unet, encoder, noise_scheduler, defaults = build_components(start)
    check_components(unet, encoder)
    size, context = unet.config.sample_size, unet.config.audio_context
    checkpoint_to_resume(args.resume, args.checkpoint_dir)  # a wrong --resume is said before the data is read
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    data = training.open_data(args.data, args.split, args.checkpoint_dir, size, accelerator)
    frame_counts = [c.frames for c in data.clips]
    with_boxes = sum(data.has_mouth_boxes(c) for c in data.clips)
    accelerator.print(
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
    models = {"unet": unet, "audio_encoder": encoder}
    embeddings = None
    if not args.train_audio_encoder:
        encoder.to(accelerator.device).eval()
        embeddings = frozen_embeddings(encoder, data, args.checkpoint_dir, accelerator)
    samples = TrainingFrames(data, size, context, embeddings)
    progress = TrainingState()
    trained = training_loop(
        LoopSettings.from_args(args),
        accelerator,
        models,
        data,
        samples,
        diffusion_losses(objective, accelerator, args.train_audio_encoder),
        state=progress,
    )
    if accelerator.is_main_process:
        unet, encoder = trained["unet"].to("cpu"), trained["audio_encoder"].to("cpu")
        pipe = pipeline_to_save(
            unet,
            encoder,
            noise_scheduler,
            defaults,
            longest_clip,
            sampling_variance=args.sampling_variance,
            stabilize_every=args.stabilize_every,
            num_inference_steps=args.inference_steps,
        )
        record = {
            "clips": len(data.clips),
            "minutes": sum(frame_counts) / FPS / 60,
            "seconds": progress.seconds,
            "device": run_device(accelerator),
        }
        os.makedirs(args.output_dir, exist_ok=True)
        samples = None
        if args.sample_frames:
            samples = write_sample_sheet(pipe.to(accelerator.device), data, args.output_dir, args.sample_frames)
        run = TrainingRun(**{name: getattr(args, name) for name in TrainingRun.__dataclass_fields__})
        pipe.save_pretrained(args.output_dir, model_card=trained_model_card(run, pipe, record, samples))
        accelerator.print(f"saved the pipeline to {args.output_dir}")
    accelerator.end_training()
    return args.output_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: train(args) and 0, interrupted="--resume latest continues from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
