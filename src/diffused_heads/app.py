"""A web page for Diffused Heads: a face photo (or video) and speech in, a talking-head video out.

    pip install "diffused-heads-diffusers[app,faces]"
    diffused-heads app                      # http://127.0.0.1:7860
    diffused-heads app --model diffused-heads-crema --port 8000

Gradio Blocks: inputs on the left, the result on the right, the built-in example below. Requests are queued and
run one at a time; each model is loaded once and kept for the next request.
"""

import argparse
import logging
import os
import tempfile
import threading
import time
from typing import List, Optional

# Gradio would otherwise report usage and look for updates over the network at start-up.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from . import example_audio_path, example_image_path, runtime  # noqa: E402
from .cli_utils import SCHEDULER_CHOICES, HelpFormatter, run_command  # noqa: E402
from .errors import MissingExtra  # noqa: E402
from .media import SAMPLING_RATE, VideoWriter, load_audio  # noqa: E402

OWN = "the model's own"
APP_EXTRA = 'the web page needs the app extra: pip install "diffused-heads-diffusers[app]"'


class Models:
    """Pipelines by model folder, each loaded once; the device is chosen once."""

    def __init__(self, default_model: Optional[str]):
        self.default_model = default_model
        self.device = runtime.resolve_device("auto")
        self.pipelines = {}
        self.lock = threading.Lock()

    def key(self, model: Optional[str]) -> Optional[str]:
        """The model a request names (the page's default when the field is empty; None: the built-in model)."""
        return (model or self.default_model or "").strip() or None

    def get(self, model: Optional[str]):
        key = self.key(model)
        with self.lock:
            if key not in self.pipelines:
                self.pipelines[key] = runtime.load_pipeline(key, self.device)
            return key, self.pipelines[key]


class RequestLog(logging.Handler):
    """The package's warnings during one request (of this thread), to show on the page."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def __enter__(self) -> List[str]:
        logging.getLogger("diffused_heads").addHandler(self)
        return self.messages

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
    max_seconds: float,
    output_dir: str,
    progress=None,
):
    """One generation, as the page runs it. Returns (video path, identity frame, warnings); raises ValueError
    (MediaError among them) with a readable message for bad input."""
    with RequestLog() as warnings:
        if not face:
            raise ValueError("add a face photo (or a video) first")
        if not speech:
            raise ValueError("add speech first: upload a recording or record one")
        steps, stabilize_every, seed = own_or_int(steps), own_or_int(stabilize_every), int(seed or 0)
        if steps is not None and steps < 1:
            raise ValueError("the steps must be at least 1")
        if stabilize_every is not None and stabilize_every < 0:
            raise ValueError("the identity frame can be put back every 0 (never) or more frames")
        key, pipe = models.get(model)
        identity = runtime.identity_frame(face, model=key, prepare=prepare)
        audio = load_audio(speech)
        seconds = len(audio) / SAMPLING_RATE
        if seconds > max_seconds:
            raise ValueError(
                f"the speech is {seconds:.1f} s long; this page takes up to {max_seconds:g} s (the command line "
                "'diffused-heads generate' takes any length)"
            )
        num_frames = pipe.audio_encoder.num_frames(len(audio))
        if num_frames < 2:
            raise ValueError(f"the speech is too short ({seconds * 1000:.0f} ms); say at least a few words")
        pipe = runtime.with_scheduler(pipe, None if scheduler in (None, "", OWN) else scheduler)
        steps = steps or runtime.default_steps(pipe)
        started = time.perf_counter()

        def on_step(pipeline, step, timestep, callback_kwargs):
            if progress is not None:
                frame = step // steps + 1
                elapsed = time.perf_counter() - started
                left = elapsed / (step + 1) * (num_frames * steps - step - 1)
                progress((step + 1, num_frames * steps), desc=f"frame {frame}/{num_frames}, about {left:.0f} s left")
            return callback_kwargs

        import torch

        path = os.path.join(tempfile.mkdtemp(dir=output_dir), "talking-head.mp4")
        with VideoWriter(path, audio) as writer:
            for output in pipe.stream(
                identity,
                audio,
                sampling_rate=SAMPLING_RATE,
                num_inference_steps=steps,
                stabilize_every=stabilize_every,
                generator=torch.Generator(models.device).manual_seed(seed),
                callback_on_step_end=on_step,
            ):
                writer.write(output.frames[0])
    return path, identity, warnings


def _readable(error: Exception, *uploads: Optional[str]) -> str:
    """The error's message with the server's copies of the uploads named by their file names."""
    message = str(error)
    for path in uploads:
        if path:
            message = message.replace(path, os.path.basename(path))
    return message


def build_app(default_model: Optional[str] = None, max_seconds: float = 30.0):
    """The Gradio page (a `gradio.Blocks`), not yet launched."""
    try:
        import gradio as gr
    except ImportError:
        raise MissingExtra(APP_EXTRA) from None

    models = Models(default_model)
    output_dir = tempfile.mkdtemp(prefix="diffused-heads-app-")

    def generate(face, speech, model, steps, scheduler, seed, stabilize_every, prepare, progress=gr.Progress()):
        try:
            path, identity, warnings = run_request(
                models,
                face,
                speech,
                model,
                steps,
                scheduler,
                seed,
                stabilize_every,
                prepare,
                max_seconds,
                output_dir,
                progress,
            )
        except (ValueError, OSError) as error:
            raise gr.Error(_readable(error, face, speech), title="Cannot make this video") from None
        for warning in warnings:
            gr.Warning(warning)
        return path, identity

    def preview(face, model, prepare):
        if not face:
            return None
        try:
            return runtime.identity_frame(face, model=models.key(model), prepare=prepare)
        except (ValueError, OSError) as error:
            raise gr.Error(_readable(error, face), title="Cannot use this face") from None

    with gr.Blocks(title="Diffused Heads") as page:
        gr.Markdown(
            "# Diffused Heads\nA face and a voice in, a talking head out (Diffused Heads, WACV 2024, as a "
            "diffusers pipeline). Without a model folder the built-in demo model is used: it knows only drawn "
            "faces on green."
        )
        with gr.Row():
            with gr.Column():
                face = gr.File(label="Face photo or video", file_types=["image", "video"], type="filepath")
                speech = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath")
                prepare = gr.Checkbox(value=True, label="Prepare the face (align it, green background)")
                with gr.Accordion("Settings", open=False):
                    model = gr.Textbox(label="Model folder", placeholder="the built-in demo model")
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
                identity = gr.Image(label="Identity frame used", type="pil", height=200)
        gr.Examples(
            examples=[[example_image_path(), example_audio_path()]],
            inputs=[face, speech],
            label="Example: the built-in model's face and sentence",
        )
        face.change(preview, inputs=[face, model, prepare], outputs=identity)
        prepare.change(preview, inputs=[face, model, prepare], outputs=identity)
        button.click(
            generate,
            inputs=[face, speech, model, steps, scheduler, seed, stabilize, prepare],
            outputs=[video, identity],
            api_name="generate",
        )
    page.queue(default_concurrency_limit=1)
    return page


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="diffused-heads app", description="Serve the Diffused Heads web page.", formatter_class=HelpFormatter
    )
    parser.add_argument("--model", help="model folder or Hub id used by default (default: the built-in demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="longest speech the page accepts")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the cores that are free)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def serve() -> int:
        runtime.configure_threads(args.threads)
        page = build_app(args.model, args.max_seconds)
        page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
        return 0

    return run_command(serve)
