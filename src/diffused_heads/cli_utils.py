"""What every command shares: the help layout, the warning channel on the terminal, and one `error:` line for
a user's mistake. Command modules import this; nothing below them does."""

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from .errors import ArgumentError, MissingExtra, with_argument

# The sampler names and precisions of `runtime`, here too so that --help answers without importing torch.
SCHEDULER_CHOICES = ("ddpm", "ddim", "dpmsolver", "unipc", "euler")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not "(default: None)" after a help text that says it)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the model and of where it runs, shared by the commands that generate."""
    parser.add_argument(
        "--model",
        help="model folder or Hub id (made by 'diffused-heads convert'); default: the built-in demo model",
    )
    parser.add_argument(
        "--steps", type=int, help="denoising steps per frame (default: the model's own; 100 for a converted model)"
    )
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        help="default: the model's own (DDPM: the original sampler for a converted model, DDPM with the "
        "posterior variance for the built-in one)",
    )
    parser.add_argument(
        "--stabilize-every",
        type=int,
        metavar="N",
        help="every N frames put the identity frame back as the older motion frame (limits drift; 0: never); "
        "default: the model's own (1 for the built-in model, off for a converted one)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="UNet precision; auto: bfloat16 where the device computes it natively (CPUs with AVX-512 BF16 or AMX, "
        "GPUs with bfloat16), else float32; the samples and the scheduler's update stay in float32",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (compiles once, pays off on long clips)"
    )
    parser.add_argument("--size", type=int, default=256, help="output frame size in pixels (the released model: 128)")


class _TerminalHandler(logging.Handler):
    """The package's log records as `warning: ...` / `note: ...` lines on the current `sys.stderr`."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else "note: "
        try:
            print(prefix + record.getMessage(), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Show the package's warnings (and notes, `logging.INFO`) on stderr as `warning: ...` / `note: ...`, once."""
    logger = logging.getLogger("diffused_heads")
    if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        logger.addHandler(_TerminalHandler())
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def flag(argument: str, flags: Optional[Dict[str, str]] = None) -> str:
    """The command-line flag of a library argument: `flags[argument]`, else `--argument-with-dashes`."""
    return (flags or {}).get(argument) or "--" + argument.replace("_", "-")


def message_of(error: BaseException, flags: Optional[Dict[str, str]] = None) -> str:
    """A user error as the command line says it: an argument's name replaced by its flag."""
    if getattr(error, "argument", None):  # an ArgumentError, or another error about one argument
        return with_argument(flag(error.argument, flags), error.detail)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {os.fsdecode(error.filename)}"
    return str(error)


USER_ERRORS = (ValueError, OSError, MissingExtra)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that files being written are cleaned up as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def run_command(body: Callable[[], int], flags: Optional[Dict[str, str]] = None, interrupted: str = "") -> int:
    """Run a command's body with the warning channel set up: a user error (a bad value, a file that cannot be
    read or written) ends as one `error:` line and exit status 1; Ctrl-C and SIGTERM unwind the body (so nothing
    half-written is left) and end with exit status 130 and 143."""
    setup_logging()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return body() or 0
    except USER_ERRORS as error:
        print(f"error: {message_of(error, flags)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        print("interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# The person segmenters of the faces extra (`faces.SEGMENTERS`), here too so that --help answers without it.
SEGMENTER_CHOICES = ("general", "landscape", "pose")


def add_face_options(parser: argparse.ArgumentParser, whose: str) -> None:
    """The options of face preparation (template, framing, background, segmenter), shared by the commands that
    prepare faces; `whose` names the person kept ("the face's", "the speaker")."""
    parser.add_argument("--model", help="a model folder whose calibrated template to use, if it has one")
    parser.add_argument("--reference", help="a real frame of the training data (image or video) to calibrate from")
    parser.add_argument(
        "--scale",
        default="recipe",
        help="framing: a number (below 1 shows more around the face, above 1 less) or recipe (1: the face-processor "
        "crop made square), tight (4/3: cut to its width), head (0.75: the whole head and hair); docs/FRAMING.md",
    )
    parser.add_argument("--background", help="R,G,B colour behind the person (default: the template's green)")
    parser.add_argument("--keep-background", action="store_true", help="only align; keep the background")
    parser.add_argument(
        "--segmenter",
        choices=SEGMENTER_CHOICES,
        default="general",
        help="the person segmenter (general measured best on busy backgrounds)",
    )
    parser.add_argument(
        "--everyone", action="store_true", help=f"keep every person the segmenter finds, not only {whose}"
    )


def parse_colour(text: Optional[str]) -> Optional[Tuple[int, int, int]]:
    if text is None:
        return None
    try:
        colour = tuple(int(c) for c in text.split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise ArgumentError("background", f"takes R,G,B with values from 0 to 255, got {text!r}")
    return colour


PROGRESS_FOLDER = ".diffused-heads-progress"


class ProgressBoard:
    """Frames made per process, shared through small files in the output folder (which every process of a run,
    on any node, writes to), so that the main process can show the whole run's progress."""

    def __init__(self, output_dir: str, process_index: int, num_processes: int):
        self.folder = os.path.join(output_dir, PROGRESS_FOLDER)
        self.process_index, self.num_processes = process_index, num_processes
        self.posted_at = 0.0
        os.makedirs(self.folder, exist_ok=True)

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"{index}.json")

    def post(self, jobs: int, frames: int, finished: bool = False, every: float = 0.0) -> None:
        """Post this process's counts (at most once per `every` seconds unless finished)."""
        now = time.monotonic()
        if not finished and now - self.posted_at < every:
            return
        self.posted_at = now
        temporary = self._path(self.process_index) + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"jobs": jobs, "frames": frames, "finished": finished}, f)
        os.replace(temporary, self._path(self.process_index))

    def read(self) -> dict:
        total = {"jobs": 0, "frames": 0, "finished": 0}
        for index in range(self.num_processes):
            try:
                with open(self._path(index), encoding="utf-8") as f:
                    posted = json.load(f)
            except (OSError, ValueError):
                continue
            total["jobs"] += posted["jobs"]
            total["frames"] += posted["frames"]
            total["finished"] += bool(posted["finished"])
        return total

    def follow(self, bar, key: str) -> None:
        """Show the whole run's `key` count ("jobs" or "frames") on the main process's progress bar until every
        process has posted that it is finished, then close the bar."""
        while (progress := self.read())["finished"] < self.num_processes:
            bar.n = progress[key]
            bar.refresh()
            time.sleep(0.5)
        bar.n = self.read()[key]
        bar.close()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


REPORT_CHOICES = ("jsonl", "tensorboard", "wandb", "all")


def add_training_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """The options every training command has (data, output, optimisation, checkpoints), with the command's own
    `defaults` (`max_steps=..., learning_rate=...`); see `check_training_options`."""
    p = parser
    p.add_argument(
        "--data",
        required=True,
        help="a prepared dataset (prepare-dataset), or a folder of ready clips: NAME.mp4 [+ NAME.wav] [+ NAME.json "
        "mouth boxes], stored once as a prepared dataset in the checkpoint folder",
    )
    p.add_argument(
        "--split", choices=("train", "test", "all"), default="train", help="which clips of a prepared dataset to use"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=min(4, max(1, (os.cpu_count() or 2) // 2)),
        help="DataLoader worker processes that read the frames (0: read in the training process)",
    )
    p.add_argument("--output-dir", required=True, help="where the trained pipeline is saved (save_pretrained)")
    p.add_argument("--checkpoint-dir", help="checkpoints and train_log.jsonl (default: OUTPUT_DIR-checkpoints)")
    p.add_argument("--max-steps", type=int, default=3000, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=10, help="frames per step per process")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (0 turns it off)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep")
    p.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    p.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    p.add_argument(
        "--report-to",
        choices=REPORT_CHOICES,
        default="jsonl",
        help="where the losses go besides train_log.jsonl in the checkpoint folder: TensorBoard (in its logs/ "
        "folder; the train extra) or Weights & Biases (pip install wandb), through accelerate's trackers",
    )
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="accelerate precision")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--sample-frames",
        type=int,
        default=8,
        help="frames the saved model makes for its model card's picture (samples.png; 0: none)",
    )
    p.set_defaults(**defaults)


def check_training_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` for a value of `add_training_options` out of range; the checkpoint folder's default."""
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error("--ema-decay must be in [0, 1)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.sample_frames < 0:
        parser.error("--sample-frames must be 0 or more")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = os.path.normpath(args.output_dir) + "-checkpoints"
