"""Make a talking-head video from one face image (or video) and a speech recording.

diffused-heads generate --image face.png --audio speech.m4a --model ./diffused-heads-crema --output out.mp4
"""

import argparse
import os
import sys
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import builtin_model_path, example_audio_path, example_image_path
from .cli import HelpFormatter
from .media import (
    SAMPLING_RATE,
    VIDEO_EXTENSIONS,
    MediaError,
    export_to_video_with_audio,
    load_audio,
    load_identity_frame,
    random_frame_index,
    save_frames,
    save_image,
    square,
)

SCHEDULERS = ("ddpm", "ddim", "dpmsolver", "unipc", "euler")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads generate",
        description="Generate a talking-head video (25 fps, H.264 + AAC) with the Diffused Heads pipeline.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--image", help="identity image (PNG, JPEG, WebP, BMP) or video; default: the built-in example face"
    )
    parser.add_argument(
        "--audio",
        help="speech: wav, flac, ogg, mp3, m4a/aac or the audio of a video; default: the built-in example sentence",
    )
    parser.add_argument("--output", default="output.mp4", help="the .mp4 file to write")
    parser.add_argument(
        "--model",
        help="model folder or Hub id (made by 'diffused-heads convert'); default: the built-in demo model",
    )
    parser.add_argument(
        "--steps", type=int, help="denoising steps per frame (default: 100; 10 for the built-in model)"
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        help="default: the model's own (DDPM: the original sampler for a converted model, DDPM with the "
        "posterior variance for the built-in one)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="UNet precision")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (compiles once, pays off on long clips)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    parser.add_argument(
        "--stabilize-every",
        type=int,
        metavar="N",
        help="every N frames put the identity frame back as the older motion frame (limits drift; 0: never); "
        "default: the model's own (1 for the built-in model, off for a converted one)",
    )
    parser.add_argument("--frame", type=int, help="with a video as --image: the frame to use (default 0)")
    parser.add_argument("--random-frame", action="store_true", help="with a video as --image: a random frame")
    parser.add_argument(
        "--no-prepare",
        action="store_true",
        help="use --image as it is; by default a photo that is not a model-ready crop (or any photo, when the model "
        "has a calibrated template) is aligned and put on the training green (needs the faces extra)",
    )
    parser.add_argument("--save-prepared", metavar="FILE", help="also save the identity frame used, as an image")
    parser.add_argument("--reference", help="a real frame of the training data to calibrate the face framing from")
    parser.add_argument("--face", default="largest", help="with several faces: 'largest' or an index from the largest")
    parser.add_argument(
        "--resize",
        choices=("crop", "stretch"),
        default="crop",
        help="non-square images: centre-crop, or stretch as the original did",
    )
    parser.add_argument("--start", type=float, default=0.0, help="start of the audio part to use, in seconds")
    parser.add_argument("--duration", type=float, help="length of the audio part to use, in seconds")
    parser.add_argument(
        "--size", type=int, default=256, help="output frame size in pixels (the released model makes 128)"
    )
    parser.add_argument("--save-frames", metavar="DIR", help="also save the frames as PNG files in DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


BUILTIN_STEPS = 10


def make_scheduler(name: str, config):
    import diffusers

    if name == "ddpm":
        return diffusers.DDPMScheduler.from_config(config)
    if name == "ddim":  # DDIM's step assumes evenly spaced timesteps ending at 0 ("trailing")
        return diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpmsolver":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    return diffusers.EulerDiscreteScheduler.from_config(config)


def check_output(args):
    if os.path.splitext(args.output)[1].lower() != ".mp4":
        raise UsageError(f"--output must end in .mp4, got {args.output}")
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f"--output {args.output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"--output: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--output: cannot write in {folder}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.stabilize_every is not None and args.stabilize_every < 0:
        raise UsageError(f"--stabilize-every must be 0 (off) or more, got {args.stabilize_every}")
    if args.size < 16 or args.size % 2:
        raise UsageError(f"--size must be an even number of at least 16, got {args.size}")


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(model: str) -> str:
    """Check that `--model` is a model folder, or a Hub id that can be had (cached, or the Hub reachable).

    Without this a mistyped folder name is taken for a Hub id, retried for half a minute and reported as a
    missing `model_index.json`."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UsageError(f"--model {model} is a folder but not a diffusers model folder (no model_index.json)")
        return model
    if os.path.exists(model):
        raise UsageError(f"--model {model} is a file; give the model folder (with model_index.json) or a Hub id")
    if (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep != "/"
        and os.sep in model
    ):
        raise UsageError(f"--model {model}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "model_index.json")
    except ValueError:  # not a valid repository id either
        raise UsageError(f"--model {model} is neither a folder here nor a valid Hub model id") from None
    if isinstance(cached, str):
        return model
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"--model {model} is neither a folder here nor a Hub model in the local cache, and the Hub is switched "
            "off (HF_HUB_OFFLINE); check the folder name or download the model first"
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise UsageError(
            f"--model {model} is neither a folder here nor reachable on the Hub ({constants.ENDPOINT} cannot be "
            "reached); check the folder name or the network"
        )
    return model


def identity_frame(
    image: str,
    log=print,
    model: Optional[str] = None,
    reference: Optional[str] = None,
    prepare: bool = True,
    frame: Optional[int] = None,
    random_frame: bool = False,
    seed: Optional[int] = None,
    face: str = "largest",
    resize: str = "crop",
):
    """The identity frame of an image or video: prepared (aligned, on green) when `prepare` is on and the model
    folder has a calibrated template (or a `reference` is given) or the image is not already a model-ready crop
    (square, with a border of the training green); else the image as it is, squared by `resize`."""
    from . import faces

    model_folder = model if model and os.path.isdir(model) else None
    template = faces.resolve_template(model_folder, reference) if prepare and (reference or model_folder) else None
    if random_frame:
        frame = random_frame_index(image, seed)
    whole = load_identity_frame(image, frame=frame, resize="stretch", log=log)
    if prepare and template is None and faces.looks_prepared(whole):
        prepare = False
    if prepare and not faces.faces_available():
        if reference:
            raise UsageError(faces.FACES_EXTRA)
        log(f"warning: the image is not a model-ready crop (a face on the training green); {faces.FACES_EXTRA}")
        prepare = False
    if not prepare:
        return square(whole, resize, log)
    is_video = os.path.splitext(image)[1].lower() in VIDEO_EXTENSIONS
    try:  # a video's frame is aligned on its points averaged over the next frames, so it is read from the file
        identity = faces.prepare_identity(
            image if is_video else whole,
            template=template,
            face=face if face == "largest" else int(face),
            frame=frame,
            log=log,
        )
    except MediaError as error:
        if template is not None or not str(error).startswith("no face found"):
            raise
        # Preparing was our idea, not the user's: an image without a detectable face (a drawing, say) is used
        # as it is.
        log(f"warning: {error}; using the image as it is (--no-prepare says so without looking)")
        return square(whole, resize, log)
    source = template.source if template is not None else "the default template"
    log(f"note: prepared the face (aligned with {source}, background replaced); --no-prepare uses the image as it is")
    return identity


def busy_cores(interval: float = 0.25) -> Optional[float]:
    """How many cores other programs keep busy right now (Linux: /proc/stat over `interval`, this process's own
    time taken out); None where that cannot be read. The load average would lag by a minute behind."""

    def ticks():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat", encoding="ascii") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(values), values[3] + values[4], int(own[11]) + int(own[12])  # total, idle, our utime + stime

    try:
        total0, idle0, own0 = ticks()
        time.sleep(interval)
        total1, idle1, own1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    others = (total1 - total0) - (idle1 - idle0) - (own1 - own0)
    return max(0.0, others / (total1 - total0) * (os.cpu_count() or 1))


def configure_threads(threads: Optional[int] = None, processes_per_node: int = 1) -> int:
    """Set torch's CPU threads: `threads`, or this process's fair share of the cores that are free.

    The UNet's many small operations each start a parallel region whose threads spin while they wait for each
    other. With more threads than free cores they spin against the other programs: on 2 cores, 1.6 s of the demo
    took 34 s with 2 threads beside one busy process and 152 s beside two, against 19 s and 34 s with 1 thread
    (10 s on a quiet machine). So the default is the cores this process may use, divided among the processes of
    the run, less those other programs keep busy (at least 1)."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cores // max(1, processes_per_node)
        busy = busy_cores()
        if busy is not None:
            threads = min(threads, cores - round(busy))
        threads = max(1, threads)
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def load_pipeline(args, device, dtype, announce: bool = True):
    from .hub.pipeline_diffused_heads import DiffusedHeadsPipeline

    model = args.model
    if model is None:
        if announce:
            print(
                "note: no --model given: using the built-in demo model (48x48, trained on synthetic drawn faces). "
                "For real faces convert the released weights with 'diffused-heads convert' and pass --model DIR.",
                file=sys.stderr,
            )
        model = builtin_model_path()
    model = resolve_model(model)
    try:
        pipe = DiffusedHeadsPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as error:  # diffusers raises several kinds for a missing or broken folder
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model {model} could not be loaded: {message}") from None
    torch.nn.Module.to(pipe.audio_encoder, torch.float32)  # small, runs once per clip
    if args.scheduler is not None:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to(device)
    if getattr(args, "compile", False):
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    return pipe


def run(args) -> str:
    check_output(args)
    configure_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    if device == "cpu" and args.dtype == "float16":
        raise UsageError("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    started = time.perf_counter()

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.image:
        identity = identity_frame(
            args.image,
            log,
            model=args.model,
            reference=args.reference,
            prepare=not args.no_prepare,
            frame=args.frame,
            random_frame=args.random_frame,
            seed=args.seed,
            face=args.face,
            resize=args.resize,
        )
    else:
        if args.frame is not None or args.random_frame:
            raise UsageError("--frame and --random-frame need a video as --image")
        log("note: no --image given: using the built-in example face")
        identity = load_identity_frame(example_image_path(), log=log)
    if args.save_prepared:
        save_image(identity, args.save_prepared)
    if args.audio:
        audio = load_audio(args.audio, start=args.start, duration=args.duration, log=log)
    else:
        log("note: no --audio given: using the built-in example sentence")
        audio = load_audio(example_audio_path(), start=args.start, duration=args.duration, log=log)

    pipe = load_pipeline(args, device, DTYPES[args.dtype])
    if args.steps is None:
        args.steps = BUILTIN_STEPS if args.model is None else 100
    pipe.set_progress_bar_config(disable=True)
    num_frames = pipe.audio_encoder.num_frames(len(audio))
    bar = tqdm(total=num_frames * args.steps, unit="step", desc="generating", dynamic_ncols=True)

    def on_step(pipeline, step, timestep, callback_kwargs):
        bar.set_description(f"frame {step // args.steps + 1}/{num_frames}", refresh=False)
        bar.update()
        return callback_kwargs

    generator = torch.Generator(device).manual_seed(args.seed)
    with bar:
        output = pipe(
            identity,
            audio,
            sampling_rate=SAMPLING_RATE,
            num_inference_steps=args.steps,
            stabilize_every=args.stabilize_every,
            generator=generator,
            callback_on_step_end=on_step,
        )
    frames = output.frames[0]
    export_to_video_with_audio(frames, output.audio[0], args.output, size=args.size, overwrite=args.overwrite)
    if args.save_frames:
        save_frames(frames, args.save_frames, size=args.size)
    seconds = time.perf_counter() - started
    print(f"Wrote {args.output} ({len(frames)} frames, {len(frames) / 25:.2f} s of video) in {seconds:.1f} s")
    return args.output


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, MediaError, ValueError, FileExistsError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
