"""The installed package: one import name, one command, package data, and model folders that stand alone."""

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import diffused_heads
from diffused_heads import cli
from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline

from helpers import ROOT, speech_like, tiny_pipeline

DISTRIBUTION = "diffused-heads-diffusers"


def run_python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter outside the repository (so only installed packages are importable)."""
    environment = {**os.environ, "HF_HOME": str(cwd / "hf-home"), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=environment)


@pytest.mark.slow
def test_the_only_installed_top_level_name_is_diffused_heads(tmp_path):
    assert metadata.distribution(DISTRIBUTION).read_text("top_level.txt").split() == ["diffused_heads"]
    names = ["media", "unet", "audio_encoder", "pipeline_diffused_heads", "generate", "convert_checkpoint", "builtin"]
    code = f"import importlib.util; print([n for n in {names!r} if importlib.util.find_spec(n)])"
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_public_names_import_from_any_folder(tmp_path):
    code = (
        "from diffused_heads import (DiffusedHeadsPipeline, DiffusedHeadsUNetModel, DiffusedHeadsAudioEncoder, "
        "load_identity_frame, load_audio, export_to_video_with_audio, builtin_model_path, example_image_path, "
        "example_audio_path)\n"
        "import os\n"
        "print(DiffusedHeadsUNetModel.__module__, os.path.isdir(builtin_model_path()), "
        "os.path.isfile(example_image_path()), os.path.isfile(example_audio_path()))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["diffused_heads.hub.unet.unet_diffused_heads", "True", "True", "True"]


@pytest.mark.slow
def test_command_lists_its_subcommands(tmp_path):
    result = subprocess.run(["diffused-heads", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^  (\S+)  ", result.stdout, flags=re.MULTILINE)
    assert listed == [
        "generate",
        "generate-batch",
        "prepare-face",
        "app",
        "convert",
        "train",
        "distill",
        "evaluate",
        "prepare-dataset",
        "make-dataset",
    ]
    unknown = subprocess.run(["diffused-heads", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: diffused-heads {command} ")
    assert "(default: None)" not in out


def test_generate_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for option in re.split(r" (?=--[a-z])", help_text):
        assert option.count("default") <= 1, option


def test_requires_python_admits_no_version_a_dependency_refuses():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    ours = SpecifierSet(project["requires-python"])
    lowest = min(Version(f"3.{minor}") for minor in range(8, 20) if Version(f"3.{minor}") in ours)
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ \[]", requirement)[0]
        theirs = metadata.metadata(name).get("Requires-Python")
        if theirs:
            assert lowest in SpecifierSet(theirs), f"{name} {metadata.version(name)} needs Python {theirs}"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"Python {lowest.major}.{lowest.minor} or newer" in readme


def _blocked_import_prelude() -> str:
    """Code that makes `diffused_heads` unimportable, as in an environment where the package is not installed."""
    return (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'diffused_heads':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )


def frames_of(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    identity = np.full((16, 16, 3), 120, np.uint8)
    generator = torch.Generator().manual_seed(0)
    return pipe(identity, speech_like(0.2), num_inference_steps=2, generator=generator).frames


def assert_loads_as_remote_code_without_the_package(folder, tmp_path, expected_frames):
    code = _blocked_import_prelude() + (
        "import json, numpy as np, torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert not any(m.split('.')[0] == 'diffused_heads' for m in sys.modules)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "identity = np.full((16, 16, 3), 120, np.uint8)\n"
        "out = pipe(identity, SPEECH, num_inference_steps=2, generator=torch.Generator().manual_seed(0))\n"
        "print(type(pipe).__name__, type(pipe.unet).__module__)\n"
        "print(json.dumps(out.frames.ravel().tolist()))\n"
    ).replace("SPEECH", f"np.array({speech_like(0.2).tolist()!r}, np.float32)")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    header, values = result.stdout.strip().splitlines()
    assert header.split()[0] == "DiffusedHeadsPipeline" and not header.split()[1].startswith("diffused_heads")
    loaded_frames = np.array(json.loads(values), np.float32).reshape(expected_frames.shape)
    np.testing.assert_allclose(loaded_frames, expected_frames, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_saved_folder_holds_only_model_code_and_loads_without_the_package(tmp_path):
    pipe = tiny_pipeline()
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    code_files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    assert code_files == [
        "audio_encoder/audio_encoder_diffused_heads.py",
        "pipeline_diffused_heads.py",
        "unet/unet_diffused_heads.py",
    ]
    assert_loads_as_remote_code_without_the_package(folder, tmp_path, frames_of(pipe))


@pytest.mark.slow
def test_builtin_model_loads_both_ways(tmp_path):
    path = diffused_heads.builtin_model_path()
    assert json.load(open(os.path.join(path, "model_index.json")))["trained_clip_seconds"] == 3.2
    local = DiffusedHeadsPipeline.from_pretrained(path)
    assert type(local.unet).__module__ == "diffused_heads.hub.unet.unet_diffused_heads"
    assert local.config.trained_clip_seconds == 3.2
    remote = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    assert type(remote).__name__ == "DiffusedHeadsPipeline" and type(remote) is not DiffusedHeadsPipeline
    identity = np.asarray(diffused_heads.load_identity_frame(diffused_heads.example_image_path()))
    generator = torch.Generator().manual_seed(0)
    for pipe in (local, remote):
        pipe.set_progress_bar_config(disable=True)
    expected = local(identity, speech_like(0.12), num_inference_steps=2, generator=generator).frames
    generator.manual_seed(0)
    np.testing.assert_allclose(
        remote(identity, speech_like(0.12), num_inference_steps=2, generator=generator).frames, expected, atol=1e-5
    )
    # Without the package it loads too: the folder carries the code.
    assert_loads_as_remote_code_without_the_package(path, tmp_path, frames_of(local))


def test_a_command_that_ends_the_program_early_skips_the_teardown_but_runs_exit_handlers_and_flushes(tmp_path):
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: open('handler-ran', 'w').write('yes'))\n"
        "import threading, time\n"
        "def late():\n    time.sleep(15)\n    open('torn-down', 'w').write('yes')\n"
        "threading.Thread(target=late).start()  # the interpreter's teardown waits for it\n"
        "from diffused_heads import cli\n"
        "cli.QUICK_EXIT.add('make-dataset')\n"
        "sys.argv = ['diffused-heads', 'make-dataset', '--output', 'clips', '--num-clips', '1', '--size', '16',\n"
        "            '--max-seconds', '1', '--speech', 'synthetic']\n"
        "print('before', end='')\n"
        "sys.exit(cli.main())\n"
        "print('never reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("before") and "never reached" not in result.stdout
    assert (tmp_path / "handler-ran").read_text() == "yes"
    assert not (tmp_path / "torn-down").exists()  # the teardown was skipped


@pytest.mark.slow
def test_saving_and_loading_work_on_the_oldest_diffusers_allowed(tmp_path):
    """The newest diffusers is what the suite itself runs on (pip installs it); here the save and load tests and
    the pipeline's run again on the oldest release that pyproject.toml allows, installed beside it."""
    project = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read())
    (requirement,) = [r for r in project["project"]["dependencies"] if r.startswith("diffusers")]
    oldest = re.fullmatch(r"diffusers>=([\d.]+)", requirement).group(1)
    oldest = oldest + ".0" * (2 - oldest.count("."))
    target = tmp_path / "oldest"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    install = subprocess.run([*command, f"diffusers=={oldest}"], capture_output=True, text=True, timeout=600)
    if install.returncode:
        message = f"cannot install diffusers {oldest}: {install.stderr[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": str(target)}
    version = subprocess.run(
        [sys.executable, "-c", "import diffusers; print(diffusers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip() == oldest, version
    tests = ["tests/test_save_load.py", "tests/test_pipeline.py", "-k", "not oldest"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:]
