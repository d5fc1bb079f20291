"""The package's layers: each module imports only from the layers below it, and no command is another's library;
and an editable install (what contributors make) runs the repository's own files."""

import ast
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "src", "diffused_heads")

# Lower numbers are lower layers (ARCHITECTURE.md).
LAYERS = {
    "errors": 0,
    "system": 0,
    "hub.pipeline_diffused_heads": 1,
    "hub.unet.unet_diffused_heads": 1,
    "hub.audio_encoder.audio_encoder_diffused_heads": 1,
    "media": 2,
    "faces": 3,
    "paste": 3,
    "synthetic_data": 3,
    "dataset": 3,
    "runtime": 4,
    "measures": 4,
    "video_preparation": 4,
    "training": 4,
    "cards": 4,
    "distillation": 5,
    "live": 5,
    "jobs": 5,
    "serving": 5,
    "evaluation": 5,
    "cli_utils": 5,
    "hub.convert_checkpoint": 6,
    "generate": 6,
    "batch": 6,
    "app": 6,
    "train": 6,
    "distill": 6,
    "evaluate": 6,
    "prepare_face": 6,
    "convert": 6,
    "make_dataset": 6,
    "prepare_dataset": 6,
    "cli": 7,
    "__main__": 8,
}
COMMANDS = {name for name, layer in LAYERS.items() if layer == 6}


def module_files():
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py") and "builtin" not in folder:
                path = os.path.join(folder, name)
                module = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
                yield module.removesuffix(".__init__") if module != "__init__" else "", path


def imported(module: str, path: str):
    """The package modules `module` imports anywhere in it (at the top or inside functions)."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("diffused_heads"):
                target = node.module[len("diffused_heads") :].lstrip(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            # `from . import runtime` imports a module; `from . import builtin_model_path` a name of the package.
            for name in names:
                candidate = f"{target}.{name}" if target else name
                yield candidate if candidate in LAYERS else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffused_heads."):
                    yield alias.name[len("diffused_heads.") :]


def test_every_module_has_a_layer():
    modules = {module for module, _ in module_files() if module and not module.endswith("__init__")}
    packages = {"hub", "hub.unet", "hub.audio_encoder"}
    assert modules - packages == set(LAYERS)


def test_modules_import_only_downward_and_no_command_is_a_library():
    wrong = []
    for module, path in module_files():
        if module in ("", "hub", "hub.unet", "hub.audio_encoder"):
            continue
        for target in set(imported(module, path)):
            if target == "":  # the package's own lazy names (builtin_model_path, ...): no import of a layer
                continue
            if target not in LAYERS:
                wrong.append(f"{module} imports {target}, which has no layer")
            elif (
                target in COMMANDS
                and module in COMMANDS
                and not (module, target) == ("convert", "hub.convert_checkpoint")
            ):
                wrong.append(f"the command {module} imports the command {target}")
            elif LAYERS[target] >= LAYERS[module] and target != module:
                if not (module in COMMANDS and target in COMMANDS):
                    wrong.append(f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})")
    assert not wrong, "\n".join(wrong)


def test_the_hub_files_stand_alone():
    """The files the Hub loads as remote code import nothing of the package (they are copied into model folders)."""
    for name in (
        "pipeline_diffused_heads.py",
        "unet/unet_diffused_heads.py",
        "audio_encoder/audio_encoder_diffused_heads.py",
    ):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m and m.startswith("diffused_heads")], name
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], name


@pytest.mark.slow
def test_an_editable_install_runs_the_repository_files(tmp_path):
    """`pip install -e .` in a fresh environment: the command works from another folder, and an edit to a file at
    the repository's root (the Hub files) takes effect without installing again."""
    source = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert files.returncode == 0, files.stderr
    for name in files.stdout.split():
        origin, target = os.path.join(ROOT, name), source / name
        if not os.path.lexists(origin):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(origin):
            os.symlink(os.readlink(origin), target)
        else:
            shutil.copy2(origin, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The packages it needs come from this environment (after the editable install's own path).
    site = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
    )
    (tmp_path / "venv-site").write_text(site.stdout)
    with open(os.path.join(site.stdout.strip(), "zz-parent.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "-e", str(source)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = venv / "bin" / "diffused-heads"
    code = "import diffused_heads.hub.pipeline_diffused_heads as p; print(p.__file__); print(p.EDITED)"
    before = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert before.returncode == 1 and "EDITED" in before.stderr
    with open(source / "pipeline_diffused_heads.py", "a", encoding="utf-8") as f:
        f.write("\nEDITED = 'yes'\n")
    after = subprocess.run([python, "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == [
        str(source / "src" / "diffused_heads" / "hub" / "pipeline_diffused_heads.py"),
        "yes",
    ]
    result = subprocess.run(
        [command, "generate", "--output", "out.mp4", "--duration", "0.2", "--steps", "1", "--size", "32"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "out.mp4").stat().st_size > 1000


COMMAND_ENTRY_POINTS = {"main", "parse_args"}


def command_names_used(path: str):
    """(command, name) for every name that the file at `path` takes from a command module: `from
    diffused_heads.generate import X`, and `X` in `generate.X` where `generate` is a command module imported by
    `from diffused_heads import generate [as alias]`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "diffused_heads":
                for alias in node.names:
                    if alias.name in COMMANDS:
                        aliases[alias.asname or alias.name] = alias.name
            elif node.module.startswith("diffused_heads."):
                module = node.module[len("diffused_heads.") :]
                if module in COMMANDS:
                    for alias in node.names:
                        yield module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                module = alias.name[len("diffused_heads.") :] if alias.name.startswith("diffused_heads.") else None
                if module in COMMANDS and alias.asname:
                    aliases[alias.asname] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield aliases[node.value.id], node.attr
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            # diffused_heads.generate.X
            inner = node.value
            if isinstance(inner.value, ast.Name) and inner.value.id == "diffused_heads" and inner.attr in COMMANDS:
                yield inner.attr, node.attr


def test_tests_use_a_command_only_through_main_and_parse_args():
    """Whatever a test needs beyond running a command lives in a library module: a command only parses and calls.
    The root's `convert_checkpoint.py` is the model repository's conversion script, which keeps its functions
    (`convert`, the configurations derived from the checkpoint) beside its command line, as diffusers' own
    conversion scripts do: its users run it without the package's commands."""
    wrong = []
    folders = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                for module, used in sorted(set(command_names_used(os.path.join(folder, name)))):
                    if used not in COMMAND_ENTRY_POINTS and module != "hub.convert_checkpoint":
                        wrong.append(f"{os.path.basename(folder)}/{name} uses {module}.{used}")
    assert not wrong, "\n".join(wrong)
