"""Every path that runs on a GPU, run once on one device, with what passed and the figures.

    python benchmarks/gpu_check.py                  # on the GPU (CUDA) when there is one, else the CPU
    python benchmarks/gpu_check.py --device cpu     # the same paths on the CPU (CI runs this)

Tiny models made here (random weights, 16 px frames) carry the paths whose correctness is checked: generate in each
precision the device has (float16 and bfloat16 on a GPU, float32 and bfloat16 on a CPU), compiled and not; a batch;
5 steps of `train` and of `distill` with EMA, stopped at 3 and resumed; converting a stand-in of the released
TorchScript files (the converter checks itself numerically); the web page's request path; speech streamed in
chunks against the whole speech; the live session. The figures (frames per second of the built-in default model)
come from the built-in models. Everything is written under a temporary folder, which is removed.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import soundfile
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' tiny models and stand-ins of the released files

import helpers  # noqa: E402


def tiny_model(folder: str) -> str:
    """A tiny random model (the tests' own), saved, with 4 steps a frame (a teacher's steps divide its 1000 training
    timesteps)."""
    from helpers import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.register_to_config(num_inference_steps=4)
    pipe.save_pretrained(folder)
    return folder


class Checks:
    def __init__(self, device: str, work: str):
        self.device, self.work, self.results = device, work, []

    def run(self, name: str, check) -> None:
        started = time.perf_counter()
        try:
            figure = check() or ""
            status = "passed"
        except Exception as error:  # a check's failure is reported, and the others still run
            figure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            status = "FAILED"
            traceback.print_exc()
        seconds = time.perf_counter() - started
        self.results.append((name, status, seconds, figure))
        print(f"{status:6}  {name:46} {seconds:6.1f} s  {figure}", flush=True)

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", action="store_true", help="on a CPU too, generate compiled (slow to compile)")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {device} ({name}); torch {torch.__version__}", flush=True)

    from diffused_heads import example_audio_path, example_image_path
    from diffused_heads.media import load_audio

    with tempfile.TemporaryDirectory() as work:
        checks = Checks(device, work)
        model = tiny_model(checks.path("tiny"))
        speech = load_audio(example_audio_path())
        soundfile.write(checks.path("speech.wav"), speech[:8000], 16000)
        dtypes = ("float16", "bfloat16") if device == "cuda" else ("float32", "bfloat16")

        def generate(dtype, compile, model_name=model, seconds=None):
            from diffused_heads import generate as command

            output = checks.path(f"out-{dtype}-{compile}-{os.path.basename(str(model_name))}.mp4")
            audio = checks.path("speech.wav") if seconds is None else example_audio_path()
            argv = ["--audio", audio, "--output", output, "--device", device, "--dtype", dtype, "--no-prepare"]
            argv += ["--model", model_name, "--overwrite"] + (["--compile"] if compile else [])
            started = time.perf_counter()
            if command.main(argv) != 0:
                raise RuntimeError("generate failed")
            import av

            with av.open(output) as container:
                frames = sum(1 for _ in container.decode(video=0))
            return f"{frames} frames, {frames / (time.perf_counter() - started):.1f} frames/s end to end"

        # Compiling takes about a minute a precision on a CPU (less once its cache is warm): there, only with
        # --compile.
        for dtype in dtypes:
            for compile in (False, True) if device == "cuda" or args.compile else (False,):
                label = f"generate {dtype}{' compiled' if compile else ''}"
                checks.run(label, lambda d=dtype, c=compile: generate(d, c))
        checks.run(
            "generate, built-in default model, demo sentence", lambda: generate("auto", False, "builtin-fast", 1)
        )

        def batch():
            from diffused_heads import batch as command

            jobs = checks.path("jobs.csv")
            with open(jobs, "w") as f:
                f.write(f"image,audio,seed,output\n{example_image_path()},{checks.path('speech.wav')},1,a.mp4\n")
                f.write(f"{example_image_path()},{checks.path('speech.wav')},2,b.mp4\n")
            argv = ["--jobs", jobs, "--output-dir", checks.path("batch"), "--model", model, "--device", device]
            if command.main(argv + ["--no-prepare"]) != 0:
                raise RuntimeError("generate-batch failed")
            return f"{len([n for n in os.listdir(checks.path('batch')) if n.endswith('.mp4')])} videos"

        checks.run("generate-batch (2 jobs)", batch)

        def data():
            from diffused_heads import make_dataset

            folder = checks.path("clips")
            if not os.path.isdir(folder):
                argv = ["--output", folder, "--num-clips", "2", "--size", "16", "--max-seconds", "1.0"]
                if make_dataset.main(argv + ["--speech", "synthetic"]) != 0:
                    raise RuntimeError("make-dataset failed")
            return folder

        def train_or_distill(which):
            from diffused_heads import distill, train

            command = train if which == "train" else distill
            output = checks.path(which)
            common = ["--data", data(), "--checkpoint-dir", output + "-checkpoints", "--batch-size", "2"]
            common += ["--checkpoint-every", "1"]
            common += ["--ema-decay", "0.9", "--log-every", "1", "--sample-frames", "0"]
            if which == "train":
                config = checks.path("tiny.json")
                with open(config, "w") as f:
                    json.dump({"unet": helpers.TINY_UNET, "audio_encoder": helpers.TINY_ENCODER}, f)
                common += ["--config", config, "--train-audio-encoder"]
            else:
                common += ["--model", model, "--rollout-frames", "1", "--method", "consistency"]
            if command.main(common + ["--max-steps", "3", "--output-dir", output + "-3"]) != 0:
                raise RuntimeError(f"{which} failed")
            if command.main(common + ["--max-steps", "5", "--resume", "latest", "--output-dir", output]) != 0:
                raise RuntimeError(f"{which} --resume failed")
            with open(os.path.join(output + "-checkpoints", "train_log.jsonl")) as f:
                steps = [json.loads(line)["step"] for line in f]
            return f"steps logged {steps}"

        checks.run("train, 5 steps with EMA, resumed at 3", lambda: train_or_distill("train"))
        checks.run("distill (consistency), 5 steps, resumed at 3", lambda: train_or_distill("distill"))

        def convert():
            from diffused_heads.hub.convert_checkpoint import convert as run_convert

            from original_model import scripted_audio_encoder, traced_unet

            unet = checks.path("crema_script.pt")
            encoder = checks.path("audio_encoder.pt")
            traced_unet(
                unet, size=16, channels=16, mult=(1, 2), blocks=1, attn_levels=(1,), head_dim=8, groups=4, audio_in=40
            )
            scripted_audio_encoder(
                encoder,
                channels=(4, 8),
                kernels=(80, 4),
                strides=(16, 2),
                paddings=(32, 1),
                code=8,
                final_kernel=100,
                hidden=8,
                layers=2,
            )
            run_convert(unet, encoder, checks.path("converted"))
            from diffused_heads import runtime

            pipe = runtime.load_pipeline(checks.path("converted"), device=device, dtype="float32")
            frames = pipe(np.zeros((16, 16, 3), np.uint8), speech[:4000], num_inference_steps=2).frames[0]
            return f"converted and verified; {len(frames)} frames on {device}"

        checks.run("convert a stand-in of the released files", convert)

        def page():
            from diffused_heads.serving import Limits, Models, run_request

            models = Models([model])
            if models.device.type != device:
                return f"skipped: the page runs on {models.device.type}"
            steps = list(
                run_request(
                    models,
                    example_image_path(),
                    checks.path("speech.wav"),
                    "",
                    2,
                    "",
                    0,
                    0,
                    False,
                    Limits(),
                    checks.path(),
                )
            )
            return f"{len(steps)} updates, video {os.path.basename(steps[-1][0])}"

        checks.run("the page's request path", page)

        def streamed():
            from diffused_heads import runtime

            pipe = runtime.load_pipeline(model, device=device, dtype="float32")
            identity = np.zeros((16, 16, 3), np.uint8)
            audio = speech[:16000]
            whole = pipe(identity, audio, generator=torch.Generator(device).manual_seed(0)).frames[0]
            chunks = (audio[k : k + 320] for k in range(0, len(audio), 320))
            parts = [
                o.frames[0] for o in pipe.stream(identity, chunks, generator=torch.Generator(device).manual_seed(0))
            ]
            difference = float(np.abs(np.stack(parts) - whole).max())
            if difference > 1 / 255:
                raise AssertionError(f"streamed frames differ from the whole speech's by {difference}")
            return f"{len(parts)} frames, at most {difference:.1e} from the whole speech's"

        checks.run("speech in 20 ms chunks = the whole speech", streamed)

        def live():
            from diffused_heads import runtime
            from diffused_heads.live import LiveSession

            pipe = runtime.load_pipeline(None, device=device, dtype="auto")
            clock = [0.0]
            session = LiveSession(
                pipe,
                np.zeros((48, 48, 3), np.uint8),
                clock=lambda: clock[0],
                sleep=lambda s: clock.__setitem__(0, clock[0] + s),
            )
            session.push(speech[:16000])
            session.end_turn()
            frames = [session.next_frame() for _ in range(40)]
            session.close()
            speaking = sum(f.speaking for f in frames)
            made = np.mean(session.stats.frame_seconds) * 1000
            return f"{speaking} speaking frames of 40; {made:.1f} ms a frame (built-in default model)"

        checks.run("the live session", live)

    failed = [name for name, status, _, _ in checks.results if status != "passed"]
    print(f"{len(checks.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
