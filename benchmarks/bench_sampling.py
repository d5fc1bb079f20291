"""Sampling speed of the pipeline: a baseline run the original way against the fast path, in one process.

    python benchmarks/bench_sampling.py                       # CPU: a small configuration
    python benchmarks/bench_sampling.py --frames 25 --steps 100 --dtype bfloat16 --compile   # GPU: full size

The UNet is CREMA-shaped (full size on CUDA, a small configuration on the CPU unless --full) with random
weights; both modes use the same weights, inputs and noise.

- baseline: float32, eager, the released attention arithmetic (per-head einsum with the softmax in float32),
  the audio encoder called once per window with its state carried, batch 1 (clips one after another).
- fast: the pipeline as shipped (batched encoder, SDPA attention) with --dtype, channels_last and optionally
  torch.compile of the UNet, all clips of --batch in one batch.

With --student K, the fast path is also timed as a K-step student samples (the same UNet with the `LCMScheduler`
that `diffused-heads distill` gives its students, on the grid of the teacher's --steps): a student's speed does not
depend on its weights, so the random weights stand in for a trained one. For example `--builtin --student 2`
(the built-in model and its 2-step student) or `--full --steps 100 --student 2` (the released size).

Prints one table: frames/s, seconds per second of audio, ms per UNet call, achieved TFLOP/s (and the share of
--peak-tflops if given), peak GPU memory, the speed-up over the baseline, and the PSNR of the fast frames
against the baseline frames made from the same noise.
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
from diffused_heads.hub.pipeline_diffused_heads import ORIGINAL_SCHEDULER_CONFIG, DiffusedHeadsPipeline
from diffused_heads.hub.unet.unet_diffused_heads import AttentionBlock, DiffusedHeadsUNetModel

SMALL = dict(block_out_channels=(64, 128, 192), attention_head_dim=32, sample_size=64)
SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "unipc": UniPCMultistepScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
}


def legacy_attention_forward(self, x):
    """The released arithmetic: per-head einsum, q and k each scaled by d^-1/4, softmax in float32."""
    b, c, h, w = x.shape
    hidden = self.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = self.to_qkv(hidden).transpose(1, 2).chunk(3, dim=1)
    d = self.head_dim
    q, k, v = (t.reshape(b * self.num_heads, d, h * w) for t in (q, k, v))
    scale = 1 / math.sqrt(math.sqrt(d))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    return x + self.to_out(out.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class PerWindowEncoder(torch.nn.Module):
    """The released audio protocol: one window per call, GRU state carried."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    @property
    def dtype(self):
        return self.encoder.dtype

    @property
    def device(self):
        return self.encoder.device

    def num_frames(self, n):
        return self.encoder.num_frames(n)

    def forward(self, waveform):
        outputs = []
        for clip in waveform:
            state = None
            for window in self.encoder.windows(clip[None])[0]:
                code = self.encoder.encode_windows(window[None])
                out, state = self.encoder.gru(code[:, None], state)
                outputs.append(out[:, 0])
        embeddings = torch.stack(outputs).reshape(waveform.shape[0], -1, outputs[0].shape[-1])
        return type("Output", (), {"audio_embeddings": embeddings})()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_flops(unet, device, dtype):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    s = cfg.sample_size
    inputs = (
        torch.randn(1, 3, s, s),
        torch.tensor([500]),
        torch.randn(1, 3, s, s),
        torch.randn(1, 2 * cfg.motion_frame_channels, s, s),
        torch.randn(1, cfg.audio_context, cfg.audio_embedding_dim),
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs))
    return counter.get_total_flops()


def run_mode(pipe, identities, audios, latents, steps, batch_at_once, device, repeats):
    times, frames = [], None
    # One generator per clip, so that both modes draw the same step noise for every clip.
    generators = lambda: [torch.Generator(device).manual_seed(100 + i) for i in range(len(audios))]  # noqa: E731
    for _ in range(repeats + 1):  # the first run is the warm-up
        synchronize(device)
        start = time.perf_counter()
        if batch_at_once:
            frames = pipe(
                identities,
                audios,
                num_inference_steps=steps,
                latents=latents,
                generator=generators(),
                output_type="pt",
            ).frames
        else:
            frames = torch.cat(
                [
                    pipe(
                        identities[i],
                        audios[i],
                        num_inference_steps=steps,
                        latents=latents[i : i + 1],
                        generator=generators()[i : i + 1],
                        output_type="pt",
                    ).frames
                    for i in range(len(audios))
                ]
            )
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), frames.float()


def matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddpm")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=1, help="clips generated at once by the fast path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in the fast path")
    parser.add_argument("--full", action="store_true", help="full CREMA size on the CPU too")
    parser.add_argument("--builtin", action="store_true", help="the built-in demo model's UNet size (48x48)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the share column")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--student", type=int, metavar="K", help="also time a K-step student (LCMScheduler) on the fast path"
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="the whole table in one run: the fast path in float16 and bfloat16, eager and compiled, each as the "
        "teacher (--steps) and as a --student K (default 2) samples; with --full on a GPU, the released size's table "
        "(meant for a GPU: most CPUs compute float16 slowly, and compiling takes minutes there)",
    )
    args = parser.parse_args()
    if args.table and not args.student:
        args.student = 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {} if (device.type == "cuda" or args.full) else SMALL
    if args.builtin:
        from diffused_heads import builtin_model_path

        config = dict(DiffusedHeadsUNetModel.load_config(builtin_model_path(), subfolder="unet"))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = DiffusedHeadsUNetModel(**config).eval().to(device)
    encoder = DiffusedHeadsAudioEncoder(hidden_size=unet.config.audio_embedding_dim).eval().to(device)
    scheduler = SCHEDULERS[args.scheduler].from_config(DDPMScheduler(**ORIGINAL_SCHEDULER_CONFIG).config)
    size = unet.config.sample_size
    samples = args.frames * 640
    rng = np.random.RandomState(0)
    audios = [rng.randn(samples).astype(np.float32) * 0.1 for _ in range(args.batch)]
    identities = [torch.rand(3, size, size) * 2 - 1 for _ in range(args.batch)]
    latents = torch.randn(args.batch, args.frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    flops = unet_flops(unet, device, torch.float32)

    rows = []
    baseline_time = baseline_frames = None
    if not args.no_baseline:
        original_forward = AttentionBlock.forward
        AttentionBlock.forward = legacy_attention_forward
        try:
            pipe = DiffusedHeadsPipeline(unet=unet, audio_encoder=PerWindowEncoder(encoder), scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            baseline_time, baseline_frames = run_mode(
                pipe, identities, audios, latents, args.steps, False, device, args.repeats
            )
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            rows.append(("baseline fp32 eager", baseline_time, memory, baseline_frames, args.steps, torch.float32))
        finally:
            AttentionBlock.forward = original_forward

    variants = [(args.dtype, args.compile)]
    if args.table:
        variants = [(d, c) for d in ("float16", "bfloat16") for c in (False, True)]
    if args.student and not 1 <= args.student < args.steps:
        parser.error("--student K needs 1 <= K < --steps")
    timed = {}  # (dtype, compile) -> (teacher seconds, student seconds)
    for dtype_name, compiled in variants:
        dtype = getattr(torch, dtype_name)
        fast_unet = DiffusedHeadsUNetModel(**config).eval()
        fast_unet.load_state_dict(unet.state_dict())
        fast_unet = torch.nn.Module.to(fast_unet, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        if compiled:
            fast_unet.compile(mode="max-autotune-no-cudagraphs" if device.type == "cuda" else "default")
        pipe = DiffusedHeadsPipeline(unet=fast_unet, audio_encoder=encoder, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fast_time, fast_frames = run_mode(
            pipe, identities, audios, latents.to(dtype), args.steps, True, device, args.repeats
        )
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        label = f"fast {dtype_name} sdpa channels_last" + (" compile" if compiled else "") + f" batch {args.batch}"
        rows.append((label, fast_time, memory, fast_frames, args.steps, dtype))
        student_time = None
        if args.student:
            from diffused_heads.distillation import student_scheduler

            pipe.scheduler = student_scheduler(scheduler.config, args.steps)
            student_time, _ = run_mode(
                pipe, identities, audios, latents.to(dtype), args.student, True, device, args.repeats
            )
            memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            student_label = f"student {args.student} steps (LCM) {dtype_name}" + label[len(f"fast {dtype_name}") :]
            rows.append((student_label, student_time, memory, None, args.student, dtype))
        timed[dtype_name, compiled] = (fast_time, student_time)

    # The device's practical peak, measured in this run for each precision (a 2048^3 matmul), so that the share
    # is honest on a noisy machine; --peak-tflops replaces it.
    peaks = {d: matmul_tflops(d, device) for d in {torch.float32, *(row[5] for row in rows)}}
    print("matmul peak, this run: " + ", ".join(f"{str(d).split('.')[1]} {p:.3f} TFLOP/s" for d, p in peaks.items()))
    total_frames = args.frames * args.batch
    print(
        f"device {device}, UNet {'full CREMA' if not config else 'small'} {size}x{size}, "
        f"{flops / 1e12:.3f} TFLOP per call, {args.frames} frames x {args.batch} clips, "
        f"{args.steps} {args.scheduler} steps, median of {args.repeats}"
    )
    width = max(45, *(len(row[0]) for row in rows))
    header = f"{'mode':{width}s} {'frames/s':>9s} {'s per s audio':>14s} {'ms/UNet call':>13s} {'TFLOP/s':>8s}"
    header += f" {'share':>6s} {'peak GiB':>9s} {'speed-up':>9s} {'PSNR dB':>8s}"
    print(header)
    for label, seconds, memory, frames, steps, dtype in rows:
        fps = total_frames / seconds
        calls = total_frames * steps
        tflops = flops * calls / seconds / 1e12
        peak = args.peak_tflops or peaks[dtype]
        share = f"{100 * tflops / peak:5.1f}%"
        speedup = f"{baseline_time / seconds:8.2f}x" if baseline_time else "     n/a"
        psnr = "     n/a"
        if baseline_frames is not None and frames is not None and frames is not baseline_frames:
            mse = F.mse_loss(frames.cpu(), baseline_frames.cpu()).item()
            psnr = f"{10 * math.log10(1 / max(mse, 1e-20)):8.1f}"
        print(
            f"{label:{width}s} {fps:9.3f} {25 / fps:14.2f} {1000 * seconds / calls:13.2f} {tflops:8.3f} {share} "
            f"{memory:9.2f} {speedup} {psnr}"
        )
    for (dtype_name, compiled), (fast_time, student_time) in timed.items():
        if student_time is not None:
            print(
                f"student ({args.student} steps) against the fast teacher ({args.steps} {args.scheduler} steps), "
                f"{dtype_name}{' compiled' if compiled else ''}: {student_time / fast_time:.3f}x the time, "
                f"{fast_time / student_time:.2f}x the frames per second"
            )


if __name__ == "__main__":
    main()
