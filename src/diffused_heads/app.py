"""A web page for Diffused Heads: a face photo (or video) and speech in, a talking-head video out.

    pip install "diffused-heads-diffusers[app,faces]"
    diffused-heads app                                   # http://127.0.0.1:7860, the built-in demo model
    diffused-heads app --model diffused-heads-crema --model ./my-finetune --port 8000

Gradio Blocks: inputs on the left, the result on the right (frames appear while they are made, then the video),
the built-in example below. The page offers the models its operator names and nothing else: a visitor picks one
from a list, and no path or Hub id typed on the page is ever read. Uploads, image sizes, speech length, the queue
and the work done at once have limits (see `--help`); results are removed after `--keep-results` minutes and
when the server stops.
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from .cli_utils import DTYPE_CHOICES, SCHEDULER_CHOICES, HelpFormatter, run_command
from .errors import MissingExtra

logger = logging.getLogger(__name__)

OWN = "the model's own"
BUILTIN_LABEL = "built-in demo model"
APP_EXTRA = 'the web page needs the app extra: pip install "diffused-heads-diffusers[app]"'
# How often the page shows the frame being made (every this many frames).
PREVIEW_EVERY = 5


class Limits:
    """What one request may ask of the server."""

    def __init__(
        self,
        max_seconds: float = 30.0,
        max_pixels: int = 40_000_000,
        max_upload_mb: float = 50.0,
        max_queue: int = 8,
        concurrency: int = 1,
        keep_minutes: float = 60.0,
    ):
        self.max_seconds, self.max_pixels, self.max_upload_mb = max_seconds, max_pixels, max_upload_mb
        self.max_queue, self.concurrency, self.keep_minutes = max_queue, concurrency, keep_minutes


def model_labels(models: List[Optional[str]]) -> Dict[str, Optional[str]]:
    """`{label shown on the page: model folder or Hub id}` (None: the built-in model); labels are the folders'
    names, so the page shows nothing of the server's file system."""
    labels = {}
    for model in models or [None]:
        label = BUILTIN_LABEL if model is None else os.path.basename(os.path.normpath(model)) or model
        base, number = label, 2
        while label in labels:
            label, number = f"{base} ({number})", number + 1
        labels[label] = model
    return labels


class Models:
    """The models the operator offers, by label, each loaded once (on first use) and kept; the device is chosen
    once."""

    def __init__(self, models: List[Optional[str]], dtype: str = "auto"):
        from . import runtime

        self.labels = model_labels(models)
        self.dtype = dtype
        self.device = runtime.resolve_device("auto")
        self.pipelines = {}
        self.lock = threading.Lock()

    @property
    def default(self) -> str:
        return next(iter(self.labels))

    def get(self, label: Optional[str]):
        """The label (the page's first model when empty) and its pipeline."""
        from . import runtime

        label = label or self.default
        if label not in self.labels:
            raise ValueError(f"this page offers the models {', '.join(self.labels)}, not {label!r}")
        with self.lock:
            if label not in self.pipelines:
                try:
                    self.pipelines[label] = runtime.load_pipeline(self.labels[label], self.device, self.dtype)
                except ValueError as error:  # said on the server's terminal only: it names the server's files
                    logger.warning(f"the model {label!r} could not be loaded: {error}")
                    raise ValueError(f"the model {label!r} could not be loaded on the server") from None
            return label, self.pipelines[label]

    def folder(self, label: Optional[str]) -> Optional[str]:
        return self.labels.get(label or self.default)


class RequestLog(logging.Handler):
    """The package's warnings during one request, to show on the page: those of the thread running the request's
    current step. Gradio runs each step of a generator on a worker thread of its own, so a request's generator
    calls `follow()` whenever it resumes."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), []

    def follow(self) -> None:
        """The request goes on in the calling thread."""
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> "RequestLog":
        logging.getLogger("diffused_heads").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("diffused_heads").removeHandler(self)


def own_or_int(value) -> Optional[int]:
    """A setting of the page: None for the model's own (or empty), else a whole number."""
    if value in (None, "", OWN):
        return None
    try:
        return int(str(value).split()[0])
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def check_upload(path: str, limits: Limits) -> None:
    """Refuse a face file whose picture has more pixels than the page takes, from its header (before decoding)."""
    from .media import picture_size

    size = picture_size(path)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise ValueError(
            f"the picture is {size[0]}x{size[1]} pixels; this page takes up to {limits.max_pixels / 1e6:g} million"
        )


def identity_for_page(
    face: str, models: Models, model: Optional[str], prepare: bool, limits: Limits, with_alignment: bool = False
):
    """The identity frame of an upload, checked against the limits first (with `with_alignment`: the frame, its
    alignment and the photo, as `runtime.identity_frame` gives them)."""
    from . import runtime

    check_upload(face, limits)
    return runtime.identity_frame(
        face,
        model=models.folder(model),
        prepare=prepare,
        max_pixels=limits.max_pixels,
        with_alignment=with_alignment,
    )


def thumbnail(image, side: int = 256):
    """A copy of a frame small enough to send back to the page."""
    import PIL.Image

    if max(image.size) <= side:
        return image
    return image.resize((side, side), PIL.Image.BICUBIC)


def for_display(frame, side: int = 256):
    """A generated frame (HxWx3 in [0, 1], at the model's size) as an image of `side` pixels for the page."""
    import PIL.Image

    image = PIL.Image.fromarray((frame * 255).round().astype("uint8"))
    return image.resize((side, side), PIL.Image.BICUBIC)


def run_request(
    models: Models,
    face: Optional[str],
    speech: Optional[str],
    model: Optional[str],
    steps,
    scheduler: str,
    seed: int,
    stabilize_every,
    prepare: bool,
    limits: Limits,
    output_dir: str,
    progress=None,
    paste_back: bool = False,
):
    """One generation, as the page runs it: yields `(video path or None, identity frame, frame being made,
    warnings)`, a frame every `PREVIEW_EVERY` frames and the finished video last; with `paste_back`, the video is
    the photo with the generated head pasted back (`generate --paste-back`). Raises ValueError (MediaError among
    them) with a readable message for bad input."""
    import torch

    from . import runtime
    from .media import SAMPLING_RATE, VIDEO_SIZE, VideoWriter, load_audio

    with RequestLog() as log:
        warnings = log.messages
        if not face:
            raise ValueError("add a face photo (or a video) first")
        if not speech:
            raise ValueError("add speech first: upload a recording or record one")
        steps, stabilize_every, seed = own_or_int(steps), own_or_int(stabilize_every), int(seed or 0)
        if steps is not None and not 1 <= steps <= 1000:
            raise ValueError("the steps must be between 1 and 1000")
        if stabilize_every is not None and stabilize_every < 0:
            raise ValueError("the identity frame can be put back every 0 (never) or more frames")
        if paste_back and not prepare:
            raise ValueError(
                "the head goes back into the photo only when the face is prepared: tick 'Prepare the face' too"
            )
        label, pipe = models.get(model)
        paste, size = None, VIDEO_SIZE
        if paste_back:
            from .paste import paste_back_for

            identity, aligned, photo = identity_for_page(face, models, label, prepare, limits, with_alignment=True)
            paste, size = paste_back_for(identity, aligned, photo)
        else:
            identity = identity_for_page(face, models, label, prepare, limits)
        audio = load_audio(speech)
        seconds = len(audio) / SAMPLING_RATE
        if seconds > limits.max_seconds:
            raise ValueError(
                f"the speech is {seconds:.1f} s long; this page takes up to {limits.max_seconds:g} s (the command "
                "line 'diffused-heads generate' takes any length)"
            )
        num_frames = pipe.audio_encoder.num_frames(len(audio))
        if num_frames < 2:
            raise ValueError(f"the speech is too short ({seconds * 1000:.0f} ms); say at least a few words")
        # Every request gets its own scheduler and sampling state: requests run at once (--concurrency).
        pipe = runtime.with_scheduler(pipe, None if scheduler in (None, "", OWN) else scheduler, own=True)
        steps = steps or runtime.default_steps(pipe)
        started = time.perf_counter()

        def on_step(pipeline, step, timestep, callback_kwargs):
            if progress is not None:
                frame = step // steps + 1
                elapsed = time.perf_counter() - started
                left = elapsed / (step + 1) * (num_frames * steps - step - 1)
                progress((step + 1, num_frames * steps), desc=f"frame {frame}/{num_frames}, about {left:.0f} s left")
            return callback_kwargs

        remove_old_results(output_dir, limits.keep_minutes)
        path = os.path.join(tempfile.mkdtemp(dir=output_dir), "talking-head.mp4")
        shown = thumbnail(identity)
        with VideoWriter(path, audio, size=size) as writer:
            for output in pipe.stream(
                identity,
                audio,
                sampling_rate=SAMPLING_RATE,
                num_inference_steps=steps,
                stabilize_every=stabilize_every,
                generator=torch.Generator(models.device).manual_seed(seed),
                callback_on_step_end=on_step,
            ):
                latest = output.frames[0]
                writer.write(latest if paste is None else paste(latest))
                if output.frame_index % PREVIEW_EVERY == 0:
                    yield None, shown, for_display(latest), warnings
                    log.follow()
        yield path, shown, for_display(latest), warnings


def remove_old_results(output_dir: str, keep_minutes: float) -> None:
    """Remove the results made more than `keep_minutes` ago."""
    cutoff = time.time() - keep_minutes * 60
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        try:
            if name != "gradio" and os.path.getmtime(path) < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _readable(error: Exception, *uploads: Optional[str]) -> str:
    """The error's message with the server's copies of the uploads named by their file names."""
    message = str(error)
    for path in uploads:
        if path:
            message = message.replace(path, os.path.basename(path))
    return message


def build_app(
    models: Optional[List[Optional[str]]] = None, limits: Optional[Limits] = None, output_dir=None, dtype="auto"
):
    """The Gradio page (a `gradio.Blocks`), not yet launched, and the folder its results go to (with gradio's own
    files, in `gradio/` inside it unless GRADIO_TEMP_DIR says otherwise)."""
    limits = limits or Limits()
    output_dir = output_dir or tempfile.mkdtemp(prefix="diffused-heads-app-")
    if "gradio" not in sys.modules:  # gradio reads it when imported
        os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(output_dir, "gradio"))
    # Gradio would otherwise report usage and look for updates over the network at start-up.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError:
        raise MissingExtra(APP_EXTRA) from None
    from . import example_audio_path, example_image_path

    models = Models(models or [None], dtype)

    def generate(
        face, speech, model, steps, scheduler, seed, stabilize_every, prepare, paste_back=False, progress=gr.Progress()
    ):
        shown = set()
        try:
            for video, identity, frame, warnings in run_request(
                models,
                face,
                speech,
                model,
                steps,
                scheduler,
                seed,
                stabilize_every,
                prepare,
                limits,
                output_dir,
                progress,
                bool(paste_back),
            ):
                for warning in warnings:
                    if warning not in shown:
                        shown.add(warning)
                        gr.Warning(_readable(Exception(warning), face, speech))
                yield video, identity, frame
        except (ValueError, OSError) as error:
            raise gr.Error(_readable(error, face, speech), title="Cannot make this video") from None

    def preview(face, model, prepare):
        if not face:
            return None
        try:
            return thumbnail(identity_for_page(face, models, model, prepare, limits))
        except (ValueError, OSError) as error:
            raise gr.Error(_readable(error, face), title="Cannot use this face") from None

    keep_seconds = int(limits.keep_minutes * 60)
    with gr.Blocks(title="Diffused Heads", delete_cache=(max(60, keep_seconds // 4), keep_seconds)) as page:
        gr.Markdown(
            "# Diffused Heads\nA face and a voice in, a talking head out (Diffused Heads, WACV 2024, as a "
            "diffusers pipeline). The built-in demo model knows only drawn faces on green."
        )
        with gr.Row():
            with gr.Column():
                face = gr.File(label="Face photo or video", file_types=["image", "video"], type="filepath")
                speech = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath")
                prepare = gr.Checkbox(value=True, label="Prepare the face (align it, green background)")
                paste_back = gr.Checkbox(
                    value=False, label="In the original photo (the head pasted back, at the photo's size)"
                )
                with gr.Accordion("Settings", open=False):
                    model = gr.Dropdown(list(models.labels), value=models.default, label="Model")
                    steps = gr.Dropdown(
                        [OWN, "5", "10", "20", "50", "100"],
                        value=OWN,
                        allow_custom_value=True,
                        label="Denoising steps per frame",
                    )
                    scheduler = gr.Dropdown([OWN, *SCHEDULER_CHOICES], value=OWN, label="Sampler")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    stabilize = gr.Dropdown(
                        [OWN, "0 (off)", "1", "5", "15"],
                        value=OWN,
                        allow_custom_value=True,
                        label="Put the identity frame back every N frames",
                    )
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                video = gr.Video(label="Talking head", buttons=["download"])
                with gr.Row():
                    identity = gr.Image(label="Identity frame used", type="pil", height=200)
                    live = gr.Image(label="Frame being made", type="pil", height=200)
        gr.Examples(
            examples=[[example_image_path(), example_audio_path()]],
            inputs=[face, speech],
            label="Example: the built-in model's face and sentence",
        )
        face.change(preview, inputs=[face, model, prepare], outputs=identity)
        prepare.change(preview, inputs=[face, model, prepare], outputs=identity)
        button.click(
            generate,
            inputs=[face, speech, model, steps, scheduler, seed, stabilize, prepare, paste_back],
            outputs=[video, identity, live],
            api_name="generate",
        )
    page.queue(default_concurrency_limit=limits.concurrency, max_size=limits.max_queue)
    return page, output_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads app", description="Serve the Diffused Heads web page.", formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        help="a model folder or Hub id the page offers (repeatable; the first is the default); default: the "
        "built-in demo model",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="longest speech a request may have")
    parser.add_argument("--max-megapixels", type=float, default=40.0, help="largest face picture, in megapixels")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest uploaded file, in MB")
    parser.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more are turned away")
    parser.add_argument("--concurrency", type=int, default=1, help="requests generated at the same time")
    parser.add_argument("--keep-results", type=float, default=60.0, help="minutes a result is kept")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the cores that are free)")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="UNet precision (auto: bfloat16 where native)"
    )
    args = parser.parse_args(argv)
    for name in ("max_seconds", "max_megapixels", "max_upload_mb", "max_queue", "concurrency", "keep_results"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def serve() -> int:
        from . import runtime

        runtime.configure_threads(args.threads)
        limits = Limits(
            max_seconds=args.max_seconds,
            max_pixels=int(args.max_megapixels * 1e6),
            max_upload_mb=args.max_upload_mb,
            max_queue=args.max_queue,
            concurrency=args.concurrency,
            keep_minutes=args.keep_results,
        )
        for model in args.model or []:
            runtime.resolve_model(model)  # a typo is found at start-up, not by the first visitor
        page, output_dir = build_app(args.model or [None], limits, dtype=args.dtype)
        try:
            page.launch(
                server_name=args.host,
                server_port=args.port,
                share=False,
                inbrowser=False,
                max_file_size=f"{int(limits.max_upload_mb * 1024)}kb",
            )
        finally:
            page.close()
            shutil.rmtree(output_dir, ignore_errors=True)
        return 0

    return run_command(serve)
