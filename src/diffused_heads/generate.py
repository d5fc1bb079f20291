"""Make a talking-head video from one face image (or video) and a speech recording.

    diffused-heads generate --image face.png --audio speech.m4a --model ./diffused-heads-crema --output out.mp4

Frames are written to the file as they are made, so memory does not grow with the length of the speech;
`--live` writes a file a player can open while it grows.
"""

import argparse
import os
import sys
import time

from .cli_utils import HelpFormatter, add_model_options, run_command


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
        help="speech: wav, flac, ogg, mp3, m4a/aac or the audio of a video; default: the built-in example sentence. "
        "'-' reads speech from standard input as it arrives (WAV, or raw 16-bit samples: --raw-rate, "
        "--raw-channels) and writes each frame once the speech it needs is in",
    )
    parser.add_argument("--raw-rate", type=int, default=16000, help="with --audio -: the rate of raw 16-bit input")
    parser.add_argument(
        "--raw-channels", type=int, default=1, help="with --audio -: the channels of raw 16-bit input (mixed down)"
    )
    parser.add_argument("--output", default="output.mp4", help="the .mp4 file to write")
    add_model_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
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
    parser.add_argument("--save-frames", metavar="DIR", help="also save the frames as PNG files in DIR")
    parser.add_argument(
        "--live",
        action="store_true",
        help="write a fragmented MP4 that a player can open while it grows; on Ctrl-C it keeps the frames made so "
        "far (by default the file appears only when complete)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--paste-back",
        action="store_true",
        help="put the talking head back into the photo: the video has the photo's size and background (--size is "
        "then not used)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=1920,
        help="with --paste-back: photos longer than this on their long side are scaled down to it",
    )
    return parser.parse_args(argv)


def check_args(args) -> None:
    from .errors import ArgumentError

    if os.path.splitext(args.output)[1].lower() != ".mp4":
        raise ArgumentError("output", f"must end in .mp4, got {args.output}")
    if os.path.exists(args.output) and not args.overwrite:
        raise ArgumentError("output", f"{args.output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ArgumentError("output", f": the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ArgumentError("output", f": cannot write in {folder}")
    if args.steps is not None and args.steps < 1:
        raise ArgumentError("steps", f"must be at least 1, got {args.steps}")
    if args.stabilize_every is not None and args.stabilize_every < 0:
        raise ArgumentError("stabilize_every", f"must be 0 (off) or more, got {args.stabilize_every}")
    if args.size < 16 or args.size % 2:
        raise ArgumentError("size", f"must be an even number of at least 16, got {args.size}")
    if args.paste_back and args.no_prepare:
        raise ArgumentError("paste_back", "needs the face's alignment to invert; it cannot be used with --no-prepare")
    if args.max_size < 16:
        raise ArgumentError("max_size", f"must be at least 16, got {args.max_size}")
    if args.audio == "-" and (args.start or args.duration is not None):
        raise ArgumentError(
            "audio", "- (speech from standard input) is read as it comes: --start and --duration do not apply"
        )
    if args.raw_rate < 1 or args.raw_channels < 1:
        raise ArgumentError(
            "raw_rate", f"and --raw-channels must be positive, got {args.raw_rate} and {args.raw_channels}"
        )
    if not args.image and (args.frame is not None or args.random_frame):
        raise ArgumentError("frame", "and --random-frame need a video as --image")
    # Where the extra files go is checked before anything is made.
    if args.save_prepared:
        folder = os.path.dirname(os.path.abspath(args.save_prepared))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ArgumentError("save_prepared", f"{args.save_prepared}: cannot write in {folder}")
    if args.save_frames:
        existing = (
            args.save_frames
            if os.path.exists(args.save_frames)
            else os.path.dirname(os.path.abspath(args.save_frames))
        )
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise ArgumentError("save_frames", f"{args.save_frames}: cannot write in {existing}")


def frame_progress(total: int, desc: str = "generating"):
    """A progress bar over frames that shows frames per second and the time left."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="frame", desc=desc, dynamic_ncols=True, smoothing=0.1)


def run(args) -> str:
    from .system import cpu_ticks

    before_imports = cpu_ticks()  # how busy the machine is is measured over the imports
    check_args(args)
    import logging

    import torch

    from . import example_audio_path, example_image_path, runtime
    from .media import FPS, SAMPLING_RATE, VideoWriter, load_audio, load_identity_frame, save_frame, save_image

    logger = logging.getLogger("diffused_heads.generate")
    runtime.configure_threads(args.threads, since=before_imports)
    device = runtime.resolve_device(args.device)
    dtype = runtime.resolve_dtype(args.dtype, device)  # a bad choice is said before anything is read
    started = time.perf_counter()

    aligned = photo = None
    if args.image:
        identity, aligned, photo = runtime.identity_frame(
            args.image,
            model=args.model,
            reference=args.reference,
            prepare=not args.no_prepare,
            frame=args.frame,
            random_frame=args.random_frame,
            seed=args.seed,
            face=args.face,
            resize=args.resize,
            with_alignment=True,
        )
    else:
        logger.info("no --image given: using the built-in example face")
        identity = load_identity_frame(example_image_path())
    if args.save_prepared:
        save_image(identity, args.save_prepared)
    streamed = args.audio == "-"
    if not args.audio:
        logger.info("no --audio given: using the built-in example sentence")
    if streamed:
        from .media import read_speech_stream

        rate, audio = read_speech_stream(sys.stdin.buffer, args.raw_rate, args.raw_channels)
    else:
        audio = load_audio(args.audio or example_audio_path(), start=args.start, duration=args.duration)
        rate = SAMPLING_RATE
    pipe = runtime.load_pipeline(args.model, device, dtype, args.scheduler, compile=args.compile)
    steps = args.steps or runtime.default_steps(pipe)
    num_frames = None if streamed else pipe.audio_encoder.num_frames(len(audio))
    if args.save_frames:
        os.makedirs(args.save_frames, exist_ok=True)
    frames = pipe.stream(
        identity,
        audio,
        sampling_rate=rate,
        num_inference_steps=steps,
        stabilize_every=args.stabilize_every,
        generator=torch.Generator(device).manual_seed(args.seed),
    )
    paste, size = None, args.size
    if args.paste_back:
        from .paste import paste_back_for

        paste, size = paste_back_for(identity, aligned, photo, args.max_size)
    writer = VideoWriter(
        args.output,
        None if streamed else audio,
        size=size,
        overwrite=args.overwrite,
        live=args.live,
        audio_per_frame=streamed,
        low_latency=streamed,
    )
    try:
        with frame_progress(num_frames) as bar, writer:
            for output in frames:
                frame = output.frames[0] if paste is None else paste(output.frames[0])
                if streamed:  # each frame's own audio comes with it
                    writer.write(frame, output.frame_audio[0])
                else:
                    writer.write(frame)
                if args.save_frames:
                    save_frame(frame, args.save_frames, output.frame_index, size=size)
                bar.update()
    except BaseException:
        if args.live and writer.frames_written:
            print(
                f"stopped: {args.output} holds the {writer.frames_written} frames made so far "
                f"({writer.frames_written / FPS:.2f} s), and plays",
                file=sys.stderr,
            )
        raise
    seconds = time.perf_counter() - started
    num_frames = writer.frames_written
    print(f"Wrote {args.output} ({num_frames} frames, {num_frames / FPS:.2f} s of video) in {seconds:.1f} s")
    return args.output


def main(argv=None) -> int:
    args = parse_args(argv)
    interrupted = "the frames made so far are kept" if args.live else "no output was written"
    return run_command(lambda: run(args) and 0, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
