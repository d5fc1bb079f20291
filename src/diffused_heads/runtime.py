"""The one layer under `generate`, `generate-batch`, the app and `evaluate`: load a model with plain arguments,
choose where and how it runs (device, dtype, CPU threads, compilation), pick a sampler for a call, hold the model's
own defaults, and turn an image or video into the identity frame.

    from diffused_heads import runtime

    pipe = runtime.load_pipeline(device="auto", dtype="auto")         # the built-in model
    fast = runtime.with_scheduler(pipe, "dpmsolver")                  # shares the weights; pipe is unchanged
    frames = fast(identity, speech, num_inference_steps=runtime.default_steps(fast)).frames[0]
"""

import contextlib
import logging
import os
import time
import warnings
from typing import Optional, Union

import torch

from . import BUILTIN_MODELS, builtin_model_path
from .errors import ArgumentError, MediaError
from .media import MAX_PIXELS, VIDEO_EXTENSIONS, load_identity_frame, random_frame_index, square
from .system import CpuTicks, cpu_ticks

logger = logging.getLogger(__name__)

SCHEDULERS = ("ddpm", "ddim", "dpmsolver", "unipc", "euler")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Where and how it runs


def resolve_device(device: str = "auto") -> torch.device:
    """`"auto"` (a CUDA GPU when there is one), `"cpu"` or `"cuda"`."""
    if device not in ("auto", "cpu", "cuda"):
        raise ArgumentError("device", f"must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", "cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX
    (on other CPUs bfloat16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # not Linux: ask oneDNN
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """The UNet's precision by name; `"auto"` is bfloat16 where the device computes it natively, else float32
    (said, each time it is chosen); float16 only on a GPU."""
    if dtype == "auto":
        dtype = "bfloat16" if native_bfloat16(device) else "float32"
        reason = "it computes bfloat16 natively" if dtype == "bfloat16" else "it has no native bfloat16"
        logger.info(f"the UNet runs in {dtype} on this {torch.device(device).type.upper()}: {reason}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ArgumentError("dtype", f"must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ArgumentError("dtype", "float16 needs a GPU; use float32 or bfloat16 on the CPU")
    return dtype


def busy_cores(interval: float = 0.25, since: Optional[CpuTicks] = None) -> Optional[float]:
    """How many cores other programs keep busy right now (Linux: /proc/stat over at least `interval` seconds,
    this process's own time taken out); None where that cannot be read. The load average would lag by a minute
    behind. `since`: a reading taken earlier (a command takes one before its imports, which then count as the
    interval instead of a wait)."""
    first = since or cpu_ticks()
    if first is None:
        return None
    waited = time.monotonic() - first.at
    if waited < interval:
        time.sleep(interval - waited)
    last = cpu_ticks()
    if last is None or last.total <= first.total:
        return None
    others = (last.total - first.total) - (last.idle - first.idle) - (last.own - first.own)
    return max(0.0, others / (last.total - first.total) * (os.cpu_count() or 1))


def configure_threads(
    threads: Optional[int] = None, processes_per_node: int = 1, since: Optional[CpuTicks] = None
) -> int:
    """Set torch's CPU threads: `threads`, or this process's fair share of the cores that are free.

    The UNet's many small operations each start a parallel region whose threads spin while they wait for each
    other. With more threads than free cores they spin against the other programs: on 2 cores, 1.6 s of the demo
    took 34 s with 2 threads beside one busy process and 152 s beside two, against 19 s and 34 s with 1 thread
    (10 s on a quiet machine). So the default is the cores this process may use, divided among the processes of
    the run, less those other programs keep busy (at least 1; measured since `since`, see `busy_cores`)."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cores // max(1, processes_per_node)
        busy = busy_cores(since=since)
        if busy is not None:
            threads = min(threads, cores - round(busy))
        threads = max(1, threads)
    if threads < 1:
        raise ArgumentError("threads", f"must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------------------------------
# The model


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


def resolve_model(model: Optional[str]) -> str:
    """The model folder or Hub id to load (None: the default built-in demo model; `builtin-fast`, `builtin-ddpm`:
    the built-in models by name), checked first: a folder with a `model_index.json`, or a Hub id that can be had
    (cached, or the Hub reachable).

    Without this a mistyped folder name is taken for a Hub id, retried for half a minute and reported as a
    missing `model_index.json`."""
    if model is None:
        return builtin_model_path()
    if model in BUILTIN_MODELS and not os.path.exists(model):
        return builtin_model_path(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ArgumentError("model", f"{model} is a folder but not a diffusers model folder (no model_index.json)")
        return model
    if os.path.exists(model):
        raise ArgumentError("model", f"{model} is a file; give the model folder (with model_index.json) or a Hub id")
    if (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    ):
        raise ArgumentError("model", f"{model}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "model_index.json")
    except ValueError:  # not a valid repository id either
        raise ArgumentError("model", f"{model} is neither a folder here nor a valid Hub model id") from None
    if isinstance(cached, str):
        return model
    if constants.HF_HUB_OFFLINE:
        raise ArgumentError(
            "model",
            f"{model} is neither a folder here nor a Hub model in the local cache, and the Hub is switched off "
            "(HF_HUB_OFFLINE); check the folder name or download the model first",
        )
    if not _hub_reachable(constants.ENDPOINT):
        raise ArgumentError(
            "model",
            f"{model} is neither a folder here nor reachable on the Hub ({constants.ENDPOINT} cannot be reached); "
            "check the folder name or the network",
        )
    return model


@contextlib.contextmanager
def no_loading_bar():
    """Without diffusers' "Loading pipeline components" bar (the callers show their own progress)."""
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_pipeline(
    model: Optional[str] = None,
    device: Union[str, torch.device] = "auto",
    dtype: Union[str, torch.dtype] = "auto",
    scheduler: Optional[str] = None,
    compile: bool = False,
):
    """Load a model folder or Hub id (None: the built-in demo model) onto `device`, its UNet in `dtype` (`"auto"`:
    bfloat16 where the device computes it natively, see `resolve_dtype`) and its audio encoder in float32 (small,
    run once per clip), optionally with another sampler (see `with_scheduler`) and a `torch.compile`d UNet. The
    progress bar is left to the caller."""
    from .hub.pipeline_diffused_heads import DiffusedHeadsPipeline

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_dtype(dtype, device)
    if model is None:
        logger.info(
            "no model given: using the built-in demo model (48x48, trained on synthetic drawn faces); for real "
            "faces convert the released weights with 'diffused-heads convert' and pass its folder"
        )
    path = resolve_model(model)
    try:
        with warnings.catch_warnings(), no_loading_bar():  # newer diffusers name it `dtype`, older `torch_dtype`
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusedHeadsPipeline.from_pretrained(path, torch_dtype=dtype)
    except Exception as error:  # diffusers raises several kinds for a missing or broken folder
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArgumentError("model", f"{model or path} could not be loaded: {message}") from None
    # nn.Module.to: diffusers' own `to` warns about float32-only modules whenever a dtype is passed, and these
    # models have none.
    torch.nn.Module.to(pipe.audio_encoder, device=device, dtype=torch.float32)
    torch.nn.Module.to(pipe.unet, device=device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # oneDNN's bfloat16 convolutions are faster on channels-last weights (benchmarks/bench_sampling.py)
        torch.nn.Module.to(pipe.unet, memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    if compile:  # in place (nn.Module.compile): the pipeline keeps its own UNet object, config and all
        pipe.unet.compile(fullgraph=True)
    return with_scheduler(pipe, scheduler)


# What each sampler needs to work here, unless the caller says otherwise: DDIM's step assumes evenly spaced timesteps
# ending at 0 ("trailing"); DPM-Solver is run in its data-prediction form.
SCHEDULER_DEFAULTS = {"ddim": {"timestep_spacing": "trailing"}, "dpmsolver": {"algorithm_type": "dpmsolver++"}}


def make_scheduler(name: str, config, **overrides):
    """A diffusers scheduler by short name, from a model's scheduler config, set up the way it works here
    (`SCHEDULER_DEFAULTS`), with `overrides` (config entries: `timestep_spacing="linspace"`, ...) over both."""
    import diffusers

    if name not in SCHEDULERS:
        raise ArgumentError("scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    classes = {
        "ddpm": diffusers.DDPMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "dpmsolver": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }
    return classes[name].from_config({**dict(config), **SCHEDULER_DEFAULTS.get(name, {}), **overrides})


def with_scheduler(pipe, name: Optional[str] = None, own: bool = False, **overrides):
    """`pipe` with another sampler (a name of `SCHEDULERS`, and/or scheduler config entries to override), as a new
    pipeline that shares the weights (`DiffusionPipeline.from_pipe`); `pipe` itself when nothing changes, unless
    `own`: then always a new pipeline with its own scheduler and sampling state, for callers that run several
    generations at once on one model (a scheduler's timesteps and a pipeline's interrupt flag belong to one
    call)."""
    if name is None and not overrides and not own:
        return pipe
    config = pipe.scheduler.config
    if name is None:
        scheduler = type(pipe.scheduler).from_config(config, **overrides)
    else:
        scheduler = make_scheduler(name, config, **overrides)
    derived = type(pipe).from_pipe(pipe, scheduler=scheduler)
    derived.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return derived


def default_steps(pipe) -> int:
    """The model's own denoising steps per frame (`num_inference_steps` in its config), else the released 100."""
    from .hub.pipeline_diffused_heads import DEFAULT_NUM_INFERENCE_STEPS

    return pipe.config.get("num_inference_steps") or DEFAULT_NUM_INFERENCE_STEPS


# --------------------------------------------------------------------------------------------------
# The identity frame


def identity_frame(
    image: str,
    model: Optional[str] = None,
    reference: Optional[str] = None,
    prepare: bool = True,
    frame: Optional[int] = None,
    random_frame: bool = False,
    seed: Optional[int] = None,
    face: Union[str, int] = "largest",
    resize: str = "crop",
    max_pixels: Optional[int] = None,
    with_alignment: bool = False,
):
    """The identity frame of an image or video file (images of more than `max_pixels` pixels are refused before
    they are decoded; default: `media.MAX_PIXELS`).

    Prepared (aligned, on green; the faces extra) when `prepare` is on and the model folder has a calibrated
    template (or a `reference` is given) or the image is not already a model-ready crop (square, with a border of
    the training green); else the image as it is, squared by `resize`. Notes and warnings go to the
    `diffused_heads` logger.

    With `with_alignment`: `(frame, aligned, photo)`, where `aligned` is the `faces.AlignedIdentity` of a
    prepared frame (its matrix and the person's mask; None when the image is used as it is) and `photo` the whole
    picture it was aligned from (for `paste.PasteBack`)."""
    from . import faces

    model_folder = model if model and os.path.isdir(model) else None
    template = faces.resolve_template(model_folder, reference) if prepare and (reference or model_folder) else None
    if random_frame:
        frame = random_frame_index(image, seed)
    whole = load_identity_frame(image, frame=frame, resize="stretch", max_pixels=max_pixels or MAX_PIXELS)
    if prepare and template is None and faces.looks_prepared(whole):
        prepare = False
    if prepare and not faces.faces_available():
        if reference:
            raise ArgumentError("reference", f"needs face preparation: {faces.FACES_EXTRA}")
        logger.warning(f"the image is not a model-ready crop (a face on the training green); {faces.FACES_EXTRA}")
        prepare = False
    if not prepare:
        return (square(whole, resize), None, whole) if with_alignment else square(whole, resize)
    is_video = os.path.splitext(image)[1].lower() in VIDEO_EXTENSIONS
    try:  # a video's frame is aligned on its points averaged over the next frames, so it is read from the file
        aligned = faces.align_identity(
            image if is_video else whole,
            template=template,
            face=face if face == "largest" else int(face),
            frame=frame,
        )
    except MediaError as error:
        if template is not None or not str(error).startswith("no face found"):
            raise
        # Preparing was our idea, not the user's: an image without a detectable face (a drawing, say) is used
        # as it is.
        logger.warning(f"{error}; using the image as it is (turning preparation off says so without looking)")
        return (square(whole, resize), None, whole) if with_alignment else square(whole, resize)
    source = template.source if template is not None else "the default template"
    logger.info(
        f"prepared the face (aligned with {source}, background replaced); turning preparation off uses the image "
        "as it is"
    )
    return (aligned.image, aligned, whole) if with_alignment else aligned.image
