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
import os
import shutil
import sys
import tempfile
from typing import List, Optional

from .cli_utils import DTYPE_CHOICES, SCHEDULER_CHOICES, HelpFormatter, run_command
from .errors import MissingExtra
from .serving import APP_EXTRA, OWN, Limits, Models, identity_for_page, readable_error, run_request, thumbnail


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
                        gr.Warning(readable_error(Exception(warning), face, speech))
                yield video, identity, frame
        except (ValueError, OSError) as error:
            raise gr.Error(readable_error(error, face, speech), title="Cannot make this video") from None

    def preview(face, model, prepare):
        if not face:
            return None
        try:
            return thumbnail(identity_for_page(face, models, model, prepare, limits))
        except (ValueError, OSError) as error:
            raise gr.Error(readable_error(error, face), title="Cannot use this face") from None

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
