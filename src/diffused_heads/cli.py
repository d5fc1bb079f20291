"""The `diffused-heads` command: one entry point, a subcommand per tool, each with its own `--help`."""

import importlib
import os
import sys
from typing import List, Optional

# subcommand -> (module defining `main(argv)`, one-line summary); modules are imported only when run.
COMMANDS = {
    "generate": (".generate", "make a talking-head video from a face image and speech"),
    "generate-batch": (".batch", "make many videos from a jobs file or a folder of clips; runs under accelerate"),
    "prepare-face": (".prepare_face", "align a face photo and put it on the training green (the faces extra)"),
    "app": (".app", "serve a web page: photo and voice in, talking video out (the app extra)"),
    "convert": (".convert", "convert the released TorchScript files into a verified model folder"),
    "train": (".train", "train a model (or fine-tune one) on talking-face clips; runs under accelerate launch"),
    "distill": (".distill", "distil a model into a few-step student (2 UNet calls a frame); runs under accelerate"),
    "evaluate": (".evaluate", "lip-sync and identity figures of a model on synthetic held-out clips"),
    "prepare-dataset": (".prepare_dataset", "make a training set from talking-head videos; runs under accelerate"),
    "make-dataset": (".make_dataset", "make synthetic talking-face clips for training and evaluation"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: diffused-heads <command> [options]",
        "",
        "Diffused Heads talking-face generation (diffusers). Commands:",
        "",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "",
        "'diffused-heads <command> --help' describes a command's options. Under accelerate:",
        "  accelerate launch [accelerate options] -m diffused_heads <command> ...",
    ]
    return "\n".join(lines)


# Commands that run in one process and whose work is done when they return: the program then ends without
# the interpreter's module-by-module teardown, which takes about a second once torch and diffusers are imported
# (4.6 s of the demo's 4.6 s became 3.6 s).
QUICK_EXIT = {"generate", "prepare-face"}


def _end_now(code: int) -> None:
    """End the program as `sys.exit(code)` would (exit handlers run, output flushed), skipping the teardown."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; `argv` None means the program's own arguments (and the program ends with the command)."""
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"diffused-heads {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\nerror: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0], __package__)
    code = module.main(rest)
    if program and command in QUICK_EXIT:
        _end_now(code or 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
