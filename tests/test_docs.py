"""Every command the README and the pages under docs/ show runs: each `diffused-heads` command line of their shell
blocks and of their inline code (also under `accelerate launch -m diffused_heads` or `python -m diffused_heads`) is
parsed by its command's own parser, each `python SCRIPT ...` by that script's own parser, and the cheap ones run."""

import argparse
import glob
import importlib
import os
import re
import runpy
import shlex
import sys

import pytest

from diffused_heads.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def shell_lines(path: str):
    """The command lines of a Markdown file's bash blocks: continuations joined, comments dropped, and each line
    split at `|`, `&&` and `;` into its commands."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    # Inline code that is a whole command (an elided one, with "...", is a pattern, not a command).
    spans = [m for m in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(diffused-heads |python3? \S+\.py\b)", m)]
    # (a span of a command's name alone names it: it is not a command line)
    spans = [span for span in spans if "..." not in span and not re.fullmatch(r"diffused-heads [\w-]+", span)]
    for block in blocks + spans:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command = []
            for word in words + ["&&"]:
                if word in ("|", "&&", ";", "||"):
                    if command:
                        yield command
                    command = []
                else:
                    command.append(word)


def package_command(words):
    """`(subcommand, its arguments)` of a line that runs the package's command, else None."""
    if words[:1] == ["diffused-heads"]:
        return words[1], words[2:]
    if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["diffused_heads"]:
        at = words.index("-m") + 2
        if words[0] in ("python", "python3", "accelerate"):
            return words[at], words[at + 1 :]
    return None


def documented_commands():
    found = []
    for page in PAGES:
        for words in shell_lines(page):
            if package_command(words) is not None or (words[0] in ("python", "python3") and words[1:2] != ["-m"]):
                found.append((os.path.relpath(page, ROOT), words))
    return found


DOCUMENTED = documented_commands()


def test_the_pages_show_commands_at_all():
    commands = {package_command(words)[0] for _, words in DOCUMENTED if package_command(words)}
    assert set(COMMANDS) - {"make-dataset"} <= commands, "every command is shown somewhere in the docs"


@pytest.mark.parametrize(
    "page, words", DOCUMENTED, ids=[f"{page}: {' '.join(words)[:80]}" for page, words in DOCUMENTED]
)
def test_every_documented_command_parses(page, words, capsys):
    command = package_command(words)
    if command is not None:
        name, arguments = command
        assert name in COMMANDS, f"{page}: no command {name!r}"
        parse = importlib.import_module(COMMANDS[name][0], "diffused_heads").parse_args
    else:
        script = os.path.join(ROOT, words[1])
        if words[1] == "-c":
            compile(words[2], page, "exec")  # a one-line program: it is valid Python
            return
        assert os.path.isfile(script), f"{page}: no script {words[1]}"
        parse, arguments = None, words[2:]
    if parse is not None:
        try:
            parse(arguments)
        except SystemExit as stop:
            pytest.fail(f"{page}: `{' '.join(words)}` does not parse: {capsys.readouterr().err.strip()}")
            raise stop
    else:  # a script: run until its parser has read the options, and stopped there
        parse_script(script, arguments, page, words, capsys)


class Parsed(Exception):
    """A script's options were read without error."""


def parse_script(script, arguments, page, words, capsys):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise Parsed

    argv = sys.argv
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [script, *arguments]
    try:
        runpy.run_path(script, run_name="__main__")
    except Parsed:
        return
    except SystemExit:
        pytest.fail(f"{page}: `{' '.join(words)}` does not parse: {capsys.readouterr().err.strip()}")
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = argv
    pytest.fail(f"{page}: `{' '.join(words)}` ran without reading options")


def test_the_readmes_main_command_makes_the_demo_video(tmp_path, monkeypatch):
    """The cheap one, run as the README shows it: the built-in model, example face and sentence, in a fresh folder."""
    from diffused_heads import generate, media

    words = next(w for p, w in DOCUMENTED if p == "README.md" and w[:2] == ["diffused-heads", "generate"])
    assert words == ["diffused-heads", "generate", "--output", "demo.mp4"]
    monkeypatch.chdir(tmp_path)
    assert generate.main(words[2:]) == 0
    frames = media.video_frame_count(str(tmp_path / "demo.mp4"))
    assert frames > 50  # the example sentence, at 25 frames a second
