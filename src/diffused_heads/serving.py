"""What the web page does for a request, apart from the page itself: the models it offers (each loaded once), the
limits of a request, the request's own warnings, and one generation as the page runs it (`run_request`)."""

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Dict, List, Optional

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
        self.device = runtime.resolve_device("auto")
        self.dtype = runtime.resolve_dtype(dtype, self.device)  # (said once, at start-up)
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


def readable_error(error: Exception, *uploads: Optional[str]) -> str:
    """The error's message with the server's copies of the uploads named by their file names."""
    message = str(error)
    for path in uploads:
        if path:
            message = message.replace(path, os.path.basename(path))
    return message
