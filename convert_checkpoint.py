#!/usr/bin/env python
"""Convert the released Diffused Heads TorchScript files into a verified diffusers model folder.

    diffused-heads convert --unet crema_script.pt --audio-encoder audio_encoder.pt --output-dir crema

(`python convert_checkpoint.py ...` in a clone does the same, once the package is installed: `pip install .`.)

The configuration is derived from the tensors; every source tensor is placed in exactly one target
tensor; both converted components are then run against the TorchScript modules on the same random
inputs, and nothing is written unless they agree.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffused_heads.cards import model_card
from diffused_heads.errors import with_argument
from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
from diffused_heads.hub.pipeline_diffused_heads import ORIGINAL_SCHEDULER_CONFIG, DiffusedHeadsPipeline
from diffused_heads.hub.unet.unet_diffused_heads import AttentionBlock, DiffusedHeadsUNetModel

RELATIVE_TOLERANCE = 1e-4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What the authors say the released model handles (their README: videos up to about 9 s).
TRAINED_CLIP_SECONDS = 9.0

# Original sub-module names -> diffusers names, inside one residual or attention block.
RESNET_KEYS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "t_emb_layers.1": "time_emb_proj",
    "audio_emb_layers.1": "audio_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION_KEYS = {"norm": "group_norm", "qkv": "to_qkv", "proj_out": "to_out"}
TOP_LEVEL_KEYS = {
    "time_embed.fc.0": "time_embedding.linear_1",
    "time_embed.fc.2": "time_embedding.linear_2",
    "audio_embed.0": "audio_embedding.linear_1",
    "audio_embed.2": "audio_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


class ConversionError(ValueError):
    """A problem with the inputs or the output of a conversion, reported to the user in one line; `argument` names
    the argument of `convert` it is about, if any (the command line shows its flag instead)."""

    def __init__(self, message: str, argument: Optional[str] = None):
        super().__init__(with_argument(argument, message) if argument else message)
        self.argument, self.detail = argument, message


@dataclass
class ConversionReport:
    unet_tensors: int = 0
    audio_encoder_tensors: int = 0
    unet_config: dict = field(default_factory=dict)
    audio_encoder_config: dict = field(default_factory=dict)
    verification: Dict[str, Dict[str, float]] = field(default_factory=dict)
    sha256: Dict[str, str] = field(default_factory=dict)
    # What the files say about how they were made: the devices written into their code, the modules saved in
    # training mode, and what that means for the conversion.
    source: Dict[str, dict] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Loading

# The TorchScript code files of an archive (`ARCHIVE/code/__torch__/....py`).
CODE_FILE = re.compile(r"(^|/)code/.*\.py$")
# A device a trace baked into the code, e.g. `torch.arange(..., device=torch.device("cuda:0"))`.
DEVICE_IN_CODE = re.compile(r'torch\.device\("([^"]+)"\)')
# Dropout recorded by a trace made in training mode: `torch.dropout(x, 0.1, True)` (the last argument is `train`).
TRAINING_DROPOUT = re.compile(r"(torch\.(?:feature_|alpha_)?dropout\([^()]*?, [0-9.eE+-]+, )True\)")


@dataclass
class ArchiveCode:
    """What the code stored in a TorchScript archive fixes at the time it was saved."""

    devices: List[str]
    training_dropouts: int

    @property
    def needs_rewrite(self) -> bool:
        return any(d != "cpu" for d in self.devices) or self.training_dropouts > 0


def read_archive_code(path: str) -> ArchiveCode:
    devices, dropouts = set(), 0
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if CODE_FILE.search(name):
                text = archive.read(name).decode("utf-8", errors="replace")
                devices.update(DEVICE_IN_CODE.findall(text))
                dropouts += len(TRAINING_DROPOUT.findall(text))
    return ArchiveCode(sorted(devices), dropouts)


def write_cpu_archive(path: str, destination: str) -> None:
    """Copy a TorchScript archive with every device in its code set to the CPU and its dropout switched off.

    Only the code changes (the weights are copied as they are); the debug tables, which point into the old code,
    are left out."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if info.filename.endswith(".debug_pkl"):
                continue
            if CODE_FILE.search(info.filename):
                text = source.read(info).decode("utf-8")
                text = DEVICE_IN_CODE.sub('torch.device("cpu")', text)
                text = TRAINING_DROPOUT.sub(r"\1False)", text)
                target.writestr(info, text.encode("utf-8"))
            else:
                with source.open(info) as reader, target.open(info, "w") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 24)


# A BatchNorm call fixed by a trace: `torch.batch_norm(x, weight, bias, mean, var, True, ...)`, its sixth argument
# `training`. A scripted module's code reads `self.training` instead.
TRACED_BATCH_NORM = re.compile(r"torch\.batch_norm\((?:[^,()]+, ){5}(True|False),")


def effective_training(submodule) -> Tuple[bool, str]:
    """Whether a module computes in training mode, and where that is read from: a trace fixes the mode in its
    graph (a later `.train()`/`.eval()` only changes the flag, not what the code computes); a scripted module's
    code reads the flag."""
    try:
        code = submodule.code
    except (RuntimeError, AttributeError):
        code = ""
    found = TRACED_BATCH_NORM.search(code)
    if found:
        return found.group(1) == "True", "graph"
    return bool(submodule.training), "flag"


def training_modules(module: torch.jit.ScriptModule) -> List[Tuple[str, str]]:
    """(name, kind) of the submodules that compute in training mode, where their output depends on it."""
    found = []
    for name, submodule in module.named_modules():
        kind = getattr(submodule, "original_name", type(submodule).__name__)
        if re.match(r"(BatchNorm|Dropout|InstanceNorm)", kind) and effective_training(submodule)[0]:
            found.append((name, kind))
    return found


def load_torchscript(path: str, what: str) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load a TorchScript archive on the CPU, with clear errors for files that are not one.

    Returns the module, as saved (its training flags kept), and what its code says about how it was made.
    A file traced on a GPU holds that device in its code, which `map_location` does not move: such a file (or
    one traced in training mode, whose dropout is part of the graph) is loaded from a temporary copy whose code
    runs on the CPU without dropout.
    """
    if not os.path.exists(path):
        raise ConversionError(f": file not found: {path}", argument=what)
    if not os.path.isfile(path):
        raise ConversionError(f": not a file: {path}", argument=what)
    if not zipfile.is_zipfile(path):
        raise ConversionError(f": {path} is not a TorchScript archive (not a zip file, or truncated)", argument=what)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ConversionError(f": {path} is a damaged archive ({error})", argument=what) from None
    if not any(re.search(r"(^|/)code/", n) for n in names) or not any(n.endswith("constants.pkl") for n in names):
        raise ConversionError(
            f": {path} is a zip archive but not TorchScript (no code/ and constants.pkl; a torch.save "
            "checkpoint is not accepted)",
            argument=what,
        )
    try:
        code = read_archive_code(path)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as error:
        raise ConversionError(f": {path} is a damaged archive ({error})", argument=what) from None
    source = path
    if code.needs_rewrite:
        handle, source = tempfile.mkstemp(prefix="cpu-", suffix=".pt")
        os.close(handle)
        try:
            write_cpu_archive(path, source)
        except BaseException:
            os.remove(source)
            raise
    try:
        module = torch.jit.load(source, map_location="cpu")
    except Exception as error:  # torch raises RuntimeError with multi-line messages for damaged archives
        raise ConversionError(
            f": {path} could not be loaded as TorchScript: {_one_line(error)}", argument=what
        ) from None
    finally:
        if source != path:
            os.remove(source)
    facts = {
        "devices_in_code": code.devices,
        "traced_on": next((d for d in code.devices if d != "cpu"), "cpu" if code.devices else "unknown"),
        "training_mode_modules": [f"{name} ({kind})" for name, kind in training_modules(module)],
        "training_dropout_in_graph": code.training_dropouts,
    }
    return module, facts


def _one_line(error: BaseException) -> str:
    """The telling line of an exception: TorchScript errors put a traceback first and the reason last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if re.match(r"^[A-Za-z.]*(Error|Exception): ", line):
            return line
    return lines[0] if lines else type(error).__name__


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# UNet: configuration and key mapping


def _count(state: Dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0


def _has(state, prefix: str) -> bool:
    return any(k.startswith(prefix + ".") for k in state)


def _require(state, keys: List[str], what: str):
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConversionError(
            f": does not look like a Diffused Heads UNet; missing keys: {', '.join(missing)}", argument=what
        )


def derive_unet_config(
    state: Dict[str, torch.Tensor],
    audio_embedding_dim: Optional[int] = None,
    attention_head_dim: int = 64,
    sample_size: int = 128,
) -> dict:
    """The UNet configuration, read off the released state dict's shapes."""
    _require(
        state,
        ["time_embed.fc.0.weight", "audio_embed.0.weight", "input_blocks.0.0.weight", "out.0.weight", "out.2.weight"],
        "unet_path",
    )
    base = state["time_embed.fc.0.weight"].shape[1]
    out_channels = state["out.2.weight"].shape[0]
    in_channels = out_channels // 2 if out_channels % 2 == 0 else out_channels
    conv_in = state["input_blocks.0.0.weight"].shape[1]
    motion_frame_channels = (conv_in - 2 * in_channels) // 2
    if motion_frame_channels not in (1, in_channels) or conv_in != 2 * in_channels + 2 * motion_frame_channels:
        raise ConversionError(
            f": cannot split {conv_in} input channels into frame, motion and identity channels",
            argument="unet_path",
        )

    num_inputs, num_outputs = _count(state, "input_blocks"), _count(state, "output_blocks")
    # Output blocks that end with an up-sampling residual block hold two residual blocks.
    upsampling = [
        i for i in range(num_outputs) if sum(_has(state, f"output_blocks.{i}.{j}.in_layers") for j in range(3)) == 2
    ]
    if num_outputs == 0 or num_inputs != num_outputs:
        raise ConversionError(
            f": unexpected block counts ({num_inputs} input, {num_outputs} output blocks)", argument="unet_path"
        )
    num_levels = len(upsampling) + 1
    layers = num_outputs // num_levels - 1
    if (
        layers < 1
        or num_levels * (layers + 1) != num_outputs
        or upsampling != [(layers + 1) * (j + 1) - 1 for j in range(num_levels - 1)]
    ):
        raise ConversionError(": the output blocks do not form a regular level structure", argument="unet_path")

    widths, attention = [], []
    for level in range(num_levels):
        first = 1 + level * (layers + 1)
        widths.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attention.append(_has(state, f"input_blocks.{first}.1.qkv"))
    context_features = state["audio_embed.0.weight"].shape[1]
    if audio_embedding_dim is None:
        audio_embedding_dim = base  # the released code sizes the audio embeddings like the base width
    if context_features % audio_embedding_dim:
        raise ConversionError(
            f": audio input of {context_features} features is no whole number of {audio_embedding_dim}-d embeddings",
            argument="unet_path",
        )
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        motion_frame_channels=motion_frame_channels,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        attention_levels=tuple(attention),
        attention_head_dim=attention_head_dim,
        audio_context=context_features // audio_embedding_dim,
        audio_embedding_dim=audio_embedding_dim,
        norm_num_groups=32,
        dropout=0.1,
    )


def unet_module_map(config: dict) -> Dict[str, Tuple[str, str]]:
    """Original module prefix -> (diffusers module prefix, kind) for every block of a configuration."""
    mapping = {}
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]

    def block(original, ours, kind):
        mapping[original] = (ours, kind)

    index = 1
    for level in range(levels):
        for r in range(layers):
            block(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{r}", "resnet")
            if config["attention_levels"][level]:
                block(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{r}", "attention")
            index += 1
        if level < levels - 1:
            block(f"input_blocks.{index}.0", f"down_blocks.{level}.downsampler", "resnet")
            index += 1
    block("middle_block.0", "mid_block.resnets.0", "resnet")
    block("middle_block.1", "mid_block.attention", "attention")
    block("middle_block.2", "mid_block.resnets.1", "resnet")
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for r in range(layers + 1):
            block(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{r}", "resnet")
            position = 1
            if config["attention_levels"][level]:
                block(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{r}", "attention")
                position = 2
            if level > 0 and r == layers:
                block(f"output_blocks.{index}.{position}", f"up_blocks.{up}.upsampler", "resnet")
            index += 1
    return mapping


def legacy_qkv_to_grouped(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder (3C, ...) rows from per-head [q, k, v] groups to all queries, all keys, all values."""
    channels = tensor.shape[0] // 3
    if channels % head_dim:
        raise ConversionError(
            f": attention width {channels} is not a multiple of the head size {head_dim}", argument="unet_path"
        )
    heads = channels // head_dim
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * channels, *rest)


def convert_unet_state_dict(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Map every original tensor to its diffusers name, reshaping 1-D convolutions and reordering attention."""
    blocks = unet_module_map(config)
    converted, unplaced = {}, []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        target = None
        if module in TOP_LEVEL_KEYS:
            target = f"{TOP_LEVEL_KEYS[module]}.{param}"
        else:
            for original, (ours, kind) in blocks.items():
                if module.startswith(original + "."):
                    inner = module[len(original) + 1 :]
                    names = RESNET_KEYS if kind == "resnet" else ATTENTION_KEYS
                    if inner in names:
                        target = f"{ours}.{names[inner]}.{param}"
                        if kind == "attention" and inner in ("qkv", "proj_out"):
                            tensor = tensor.reshape(tensor.shape[0], -1) if param == "weight" else tensor
                            if inner == "qkv":
                                tensor = legacy_qkv_to_grouped(tensor, config["attention_head_dim"])
                    break
        if target is None:
            unplaced.append(key)
        elif target in converted:
            raise ConversionError(f": two source tensors map to {target}", argument="unet_path")
        else:
            converted[target] = tensor
    if unplaced:
        raise ConversionError(
            f": {len(unplaced)} tensors have no place in the UNet: {', '.join(unplaced[:8])}", argument="unet_path"
        )
    return converted


def build_unet(state: Dict[str, torch.Tensor], config: dict) -> Tuple[DiffusedHeadsUNetModel, int]:
    """The converted UNet and the number of source tensors placed in it."""
    converted = convert_unet_state_dict(state, config)
    with torch.device("meta"):
        model = DiffusedHeadsUNetModel(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    wrong = [k for k in converted if k in expected and tuple(converted[k].shape) != expected[k]]
    if missing or wrong:
        details = [f"not found: {', '.join(missing[:8])}"] if missing else []
        details += [f"wrong shape: {', '.join(wrong[:8])}"] if wrong else []
        raise ConversionError(
            f": the file does not fit the derived configuration ({'; '.join(details)})", argument="unet_path"
        )
    model.load_state_dict({k: v.contiguous() for k, v in converted.items()}, assign=True)
    return model.eval(), len(converted)


# --------------------------------------------------------------------------------------------------
# Audio encoder: configuration and key mapping


def _conv_settings(module: Optional[torch.jit.ScriptModule], name: str, kernel: int, index: int) -> Tuple[int, int]:
    """Stride and padding of a convolution: read off the TorchScript module, else the released encoder's rule
    (the first convolution strides a fifth of its kernel, the others half; padding ceil((kernel - stride) / 2))."""
    try:
        submodule = dict(module.named_modules())[name]
        return int(submodule.stride[0]), int(submodule.padding[0])
    except Exception:
        stride = kernel // 5 if index == 0 else kernel // 2
        return stride, math.ceil((kernel - stride) / 2)


def derive_audio_encoder_config(
    state: Dict[str, torch.Tensor], module: Optional[torch.jit.ScriptModule] = None, window_length: int = 3200
) -> dict:
    convs = _count(state, "encoder.cl")
    grus = len([k for k in state if re.fullmatch(r"rnn\.weight_hh_l\d+", k)])
    if convs < 2 or grus < 1 or "rnn.weight_ih_l0" not in state:
        raise ConversionError(
            ": does not look like the Diffused Heads speech encoder; expected encoder.cl.N and "
            f"rnn.weight_*_lN tensors, found e.g. {', '.join(list(state)[:4])}",
            argument="audio_encoder_path",
        )
    channels, kernels, strides, paddings = [], [], [], []
    length = window_length
    for i in range(convs - 1):
        out, _, kernel = state[f"encoder.cl.{i}.weight"].shape
        stride, padding = _conv_settings(module, f"encoder.cl.{i}", kernel, i)
        channels.append(out)
        kernels.append(kernel)
        strides.append(stride)
        paddings.append(padding)
        length = (length + 2 * padding - kernel) // stride + 1
    code_size, _, final_kernel = state[f"encoder.cl.{convs - 1}.weight"].shape
    if final_kernel != length:
        raise ConversionError(
            f": the last convolution spans {final_kernel} steps but a {window_length}-sample window "
            f"leaves {length}; strides {strides} or paddings {paddings} are not those of the file",
            argument="audio_encoder_path",
        )
    return dict(
        sampling_rate=16000,
        window_length=window_length,
        hop_length=640,
        conv_channels=tuple(channels),
        conv_kernel_sizes=tuple(kernels),
        conv_strides=tuple(strides),
        conv_paddings=tuple(paddings),
        code_size=code_size,
        hidden_size=state["rnn.weight_hh_l0"].shape[1],
        num_gru_layers=grus,
    )


def convert_audio_encoder_state_dict(state: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    last = len(config["conv_channels"])
    converted, unplaced = {}, []
    for key, tensor in state.items():
        match = re.match(r"^encoder\.cl\.(\d+)\.(weight|bias)$", key)
        norm = re.match(r"^encoder\.activations\.(\d+)\.0\.(\w+)$", key)
        gru = re.match(r"^rnn\.(\w+_l\d+)$", key)
        if match:
            index = int(match.group(1))
            target = f"code_conv.{match.group(2)}" if index == last else f"convs.{index}.{match.group(2)}"
        elif norm:
            target = f"norms.{norm.group(1)}.{norm.group(2)}"
        elif gru:
            target = f"gru.{gru.group(1)}"
        else:
            unplaced.append(key)
            continue
        converted[target] = tensor
    if unplaced:
        raise ConversionError(
            f": tensors with no place in the encoder: {', '.join(unplaced[:8])}", argument="audio_encoder_path"
        )
    return converted


def build_audio_encoder(state, config) -> Tuple[DiffusedHeadsAudioEncoder, int]:
    """The converted audio encoder and the number of source tensors placed in it."""
    converted = convert_audio_encoder_state_dict(state, config)
    model = DiffusedHeadsAudioEncoder(**config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    wrong = [k for k in converted if k not in expected or tuple(converted[k].shape) != expected[k]]
    if missing or wrong:
        raise ConversionError(
            f": the file does not fit the derived configuration (not found: {missing[:8]}, "
            f"unexpected or wrong shape: {wrong[:8]})",
            argument="audio_encoder_path",
        )
    model.load_state_dict(converted)
    return model.eval(), len(converted)


# --------------------------------------------------------------------------------------------------
# Verification


def _differences(reference: torch.Tensor, ours: torch.Tensor) -> Dict[str, float]:
    reference, ours = reference.double(), ours.double()
    absolute = (reference - ours).abs().max().item()
    return {"max_abs": absolute, "max_rel": absolute / max(reference.abs().max().item(), 1e-12)}


def norm_groups_from_module(module: torch.jit.ScriptModule, state) -> Optional[int]:
    """Find the GroupNorm group count by running the output GroupNorm; None if it cannot be run."""
    weight, bias = state["out.0.weight"], state["out.0.bias"]
    channels = weight.shape[0]
    x = torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            reference = dict(module.named_modules())["out.0"](x)
    except Exception:
        return None
    for groups in dict.fromkeys([32] + [g for g in range(1, channels + 1) if channels % g == 0]):
        if channels % groups == 0 and torch.allclose(F.group_norm(x, groups, weight, bias), reference, atol=1e-5):
            return groups
    return None


def attention_head_dim_from_module(module: torch.jit.ScriptModule, state, config: dict) -> Optional[int]:
    """Find the head size by running one TorchScript attention block against candidates; None if not callable."""
    prefix = next((p for p, (_, kind) in unet_module_map(config).items() if kind == "attention"), None)
    if prefix is None:
        return config["attention_head_dim"]
    submodule = dict(module.named_modules()).get(prefix)
    channels = state[f"{prefix}.norm.weight"].shape[0]
    x = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            reference = submodule(x)
    except Exception:
        return None
    candidates = [config["attention_head_dim"]] + [d for d in range(1, channels + 1) if channels % d == 0]
    for head_dim in dict.fromkeys(candidates):
        if channels % head_dim:
            continue
        block = AttentionBlock(channels, head_dim, config["norm_num_groups"])
        weights = {
            "group_norm.weight": state[f"{prefix}.norm.weight"],
            "group_norm.bias": state[f"{prefix}.norm.bias"],
            "to_qkv.weight": legacy_qkv_to_grouped(state[f"{prefix}.qkv.weight"].reshape(3 * channels, -1), head_dim),
            "to_qkv.bias": legacy_qkv_to_grouped(state[f"{prefix}.qkv.bias"], head_dim),
            "to_out.weight": state[f"{prefix}.proj_out.weight"].reshape(channels, -1),
            "to_out.bias": state[f"{prefix}.proj_out.bias"],
        }
        block.load_state_dict(weights)
        with torch.no_grad():
            if _differences(reference, block(x))["max_rel"] < RELATIVE_TOLERANCE:
                return head_dim
    return None


def batch_norm_statistics(module: torch.jit.ScriptModule, facts: dict, log=print) -> str:
    """ "window" when the encoder's BatchNorm layers compute in training mode, else "running".

    The mode is what the file computes: for a trace, the mode baked into its graph (whatever the modules' flags
    say, which a `.train()` or `.eval()` after tracing changes alone); for a scripted file, the flags. The original
    sampler never switches the encoder to eval mode, so a file in training mode normalises each window (it is
    called with one window at a time) with that window's own statistics; the converted encoder is set up to
    compute the same."""
    norms = [
        (name, *effective_training(submodule), submodule.training)
        for name, submodule in module.named_modules()
        if getattr(submodule, "original_name", "").startswith("BatchNorm")
    ]
    if not norms:
        return "running"
    training = [name for name, mode, _, _ in norms if mode]
    disagreeing = [name for name, mode, source, flag in norms if source == "graph" and mode != flag]
    if disagreeing:
        graph = "training" if training else "eval"
        log(
            f"The audio encoder is a trace made in {graph} mode whose modules were switched to "
            f"{'eval' if graph == 'training' else 'training'} mode afterwards; that switch does not change what the "
            f"trace computes, so the conversion follows the graph ({graph} mode)"
        )
    facts["batch_norm_mode_from"] = sorted({source for _, _, source, _ in norms})
    if not training:
        return "running"
    if len(training) != len(norms):
        raise ConversionError(
            f": some BatchNorm layers compute in training mode ({', '.join(training)}) and some "
            "not; the original computation cannot be restated with one setting",
            argument="audio_encoder_path",
        )
    log(
        "The audio encoder computes in training mode and the original sampler never calls .eval(): its BatchNorm "
        "layers normalise each window with that window's own statistics. The converted encoder does the same "
        '(batch_norm_statistics="window"), verified against the file run that way'
    )
    facts["meaning"] = "BatchNorm uses per-window statistics, as the original sampler computed"
    return "window"


def explain_unet_training_mode(facts: dict, log=print) -> None:
    """Say what a UNet traced in training mode means: GroupNorm is the same in both modes, dropout is not."""
    if facts["training_dropout_in_graph"]:
        facts["meaning"] = (
            f"traced in training mode: {facts['training_dropout_in_graph']} dropout layers were active in the graph, "
            "so the original sampler's predictions were randomised by dropout at every step; the converted UNet "
            "runs without dropout (inference), verified against the file with its dropout switched off; "
            "pipe.unet.train() would restore the dropout"
        )
        log(f"The UNet file was {facts['meaning']}")
    elif facts["training_mode_modules"]:
        facts["meaning"] = (
            "saved with training-mode flags, but its graph holds no dropout in training mode and its GroupNorm "
            "layers compute the same in both modes: nothing changes"
        )
        log(f"The UNet file was {facts['meaning']}")


def _checked(verification, what: str, module, model) -> Dict[str, float]:
    """Run one verification; any failure inside TorchScript or our model becomes one line that says what to try."""
    try:
        return verification(module, model)
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(
            f"verification of {what} failed to run ({_one_line(error)}); nothing was written. The file may need "
            "what it was made with (a device, an input size: see --sample-size); --no-verify converts without "
            "the check"
        ) from None


def verify_unet(module, model: DiffusedHeadsUNetModel, seed: int = 0) -> Dict[str, float]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    inputs = (
        torch.randn(1, cfg.in_channels, size, size, generator=g),
        torch.randint(0, 1000, (1,), generator=g),
        torch.rand(1, cfg.in_channels, size, size, generator=g) * 2 - 1,
        torch.rand(1, 2 * cfg.motion_frame_channels, size, size, generator=g) * 2 - 1,
        torch.randn(1, cfg.audio_context, cfg.audio_embedding_dim, generator=g),
    )
    with torch.no_grad():
        reference = module(*inputs)
        ours = model(*inputs).sample
    if reference.shape != ours.shape:
        raise ConversionError(
            f"verification: TorchScript UNet gives {tuple(reference.shape)}, ours {tuple(ours.shape)}"
        )
    return _differences(reference, ours)


def verify_audio_encoder(module, model: DiffusedHeadsAudioEncoder, seconds: float = 3.0, seed: int = 0):
    """The original one-window-per-call protocol through TorchScript against the batched component."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    waveform = (torch.rand(int(seconds * cfg.sampling_rate), generator=g) * 2 - 1) * 0.5
    windows = model.windows(waveform[None])[0]
    state = torch.zeros(cfg.num_gru_layers, 1, cfg.hidden_size)
    outputs = []
    with torch.no_grad():
        for window in windows:
            embedding, _, state = module(
                window.reshape(1, 1, -1), torch.LongTensor([cfg.window_length]), init_state=state
            )
            outputs.append(embedding.reshape(-1))
        reference = torch.stack(outputs)
        ours = model(waveform[None]).audio_embeddings[0]
    if reference.shape != ours.shape:
        raise ConversionError(
            f"verification: TorchScript encoder gives {tuple(reference.shape)} per clip, ours {tuple(ours.shape)}"
        )
    return _differences(reference, ours)


# --------------------------------------------------------------------------------------------------
# Output


MODEL_DESCRIPTION = """The Diffused Heads model of *Diffusion Models Beat GANs on Talking-Face Generation*
(Stypułkowski, Vougioukas, He, Zięba, Petridis, Pantic; WACV 2024,
[arXiv:2301.03396](https://arxiv.org/abs/2301.03396)), converted from the authors' released TorchScript
files into a diffusers pipeline. It animates one face image with a speech recording, one 128×128 frame
at a time at 25 fps. The weights keep the authors' licence (CC BY-NC-SA 4.0, non-commercial)."""

MODEL_USAGE = """```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True, torch_dtype={dtype})
pipe.to("cuda")
out = pipe(identity_image, audio, sampling_rate=16000, generator=torch.Generator("cuda").manual_seed(0))
frames = out.frames[0]  # (num_frames, 128, 128, 3) in [0, 1]
```

`identity_image` is a PIL image (a face centred on a green background, like the CREMA-D crops works
best); `audio` is a 1-D waveform. DDPM with 100 steps reproduces the original sampler; any other diffusers
scheduler can be swapped in (`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`)."""


def write_model_folder(
    unet, audio_encoder, directory: str, report: ConversionReport, dtype: str, repo: str, template=None
):
    pipe = DiffusedHeadsPipeline(
        unet=unet,
        audio_encoder=audio_encoder,
        scheduler=DDPMScheduler(**ORIGINAL_SCHEDULER_CONFIG),
        trained_clip_seconds=TRAINED_CLIP_SECONDS,
    )
    pipe.save_pretrained(directory)
    record = {
        "source_sha256": report.sha256,
        "tensors_converted": {"unet": report.unet_tensors, "audio_encoder": report.audio_encoder_tensors},
        "verification_float32": report.verification,
        "source_files": report.source,
        "saved_dtype": dtype,
    }
    if template is not None:  # where prepare-face puts the face, measured on a real frame of the training data
        template.save(directory)
        record["identity_template"] = template.source
    card = model_card(
        "Diffused Heads (CREMA-D) for diffusers",
        MODEL_DESCRIPTION,
        license="cc-by-nc-sa-4.0",
        usage=MODEL_USAGE.replace("{repo}", repo).replace("{dtype}", f"torch.{dtype}"),
        sections={"Conversion record": "```json\n" + json.dumps(record, indent=2) + "\n```"},
    )
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def check_output_dir(output_dir: str, overwrite: bool) -> str:
    """The absolute output folder, once it is clear it can be written (its parent exists and is writable)."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise ConversionError(f"{output_dir} exists; pass --overwrite to replace it", argument="output_dir")
    parent = os.path.dirname(output_dir)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ConversionError(f": {parent} is a file, not a folder", argument="output_dir")
    if not os.path.isdir(parent):
        raise ConversionError(f": parent folder {parent} does not exist", argument="output_dir")
    if not os.access(parent, os.W_OK):
        raise ConversionError(f": cannot write in {parent}", argument="output_dir")
    return output_dir


def read_released_files(unet_path: str, audio_encoder_path: str, report: ConversionReport, log=print):
    """Both TorchScript modules, loaded as saved, checked to be a UNet and a speech encoder (in that order)."""
    log(f"Loading {unet_path} and {audio_encoder_path}")
    unet_module, report.source["unet"] = load_torchscript(unet_path, "unet_path")
    encoder_module, report.source["audio_encoder"] = load_torchscript(audio_encoder_path, "audio_encoder_path")
    for name, facts in report.source.items():
        if facts["traced_on"] not in ("cpu", "unknown"):
            log(f"The {name} file was traced on {facts['traced_on']}; its code is run on the CPU here")
    unet_state, encoder_state = unet_module.state_dict(), encoder_module.state_dict()
    if _has(unet_state, "rnn") and not _has(unet_state, "time_embed"):
        raise ConversionError(
            ": this file is a speech encoder, not the UNet (were the two files swapped?)", argument="unet_path"
        )
    if _has(encoder_state, "time_embed") and not _has(encoder_state, "rnn"):
        raise ConversionError(
            ": this file is a UNet, not the speech encoder (were the two files swapped?)",
            argument="audio_encoder_path",
        )
    return unet_module, encoder_module, unet_state, encoder_state


def derive_configs(
    unet_module, encoder_module, unet_state, encoder_state, report: ConversionReport, sample_size: int, log=print
) -> None:
    """Both configurations, from the tensors' shapes and, where shapes cannot tell, from running parts of the
    modules; stored in `report`."""
    encoder_config = derive_audio_encoder_config(encoder_state, encoder_module)
    encoder_config["batch_norm_statistics"] = batch_norm_statistics(
        encoder_module, report.source["audio_encoder"], log
    )
    unet_config = derive_unet_config(
        unet_state, audio_embedding_dim=encoder_config["hidden_size"], sample_size=sample_size
    )
    explain_unet_training_mode(report.source["unet"], log)
    groups = norm_groups_from_module(unet_module, unet_state)
    if groups is None:
        log("Could not run the output GroupNorm alone; assuming 32 groups")
    else:
        unet_config["norm_num_groups"] = groups
    head_dim = attention_head_dim_from_module(unet_module, unet_state, unet_config)
    if head_dim is None:
        log("Could not run an attention block alone; assuming 64 channels per attention head")
    else:
        unet_config["attention_head_dim"] = head_dim
    report.unet_config, report.audio_encoder_config = unet_config, encoder_config


def verify(unet_module, encoder_module, unet, audio_encoder, report: ConversionReport, log=print) -> None:
    """Run both pairs of modules on the same inputs; raise unless they agree within `RELATIVE_TOLERANCE`."""
    start = time.perf_counter()
    report.verification["unet"] = _checked(verify_unet, "the UNet", unet_module, unet)
    report.verification["audio_encoder"] = _checked(
        verify_audio_encoder, "the audio encoder", encoder_module, audio_encoder
    )
    for name, diff in report.verification.items():
        log(f"Verified {name}: max abs diff {diff['max_abs']:.3e}, max rel diff {diff['max_rel']:.3e}")
    log(f"Verification took {time.perf_counter() - start:.1f} s")
    failed = [n for n, d in report.verification.items() if not d["max_rel"] <= RELATIVE_TOLERANCE]
    if failed:
        raise ConversionError(
            f"verification failed for {', '.join(failed)}: relative difference above {RELATIVE_TOLERANCE:g}; "
            "nothing was written"
        )


def write_atomically(output_dir: str, write) -> None:
    """Call `write(folder)` on a new folder beside `output_dir`, then put it in `output_dir`'s place: a failure
    leaves nothing behind, and an existing folder is replaced only by a complete one."""
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=os.path.dirname(output_dir))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes 0o700; give the folder the mode os.mkdir would
        write(temporary)
        if os.path.exists(output_dir):
            old = temporary + ".old"
            os.rename(output_dir, old)
            os.rename(temporary, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temporary, output_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def push_folder(output_dir: str, repo_id: str, private: bool = False, hub_api=None) -> str:
    """Upload the folder to a Hub model repository (created if needed); returns its address."""
    if hub_api is None:
        from huggingface_hub import HfApi

        hub_api = HfApi()
    repo_url = hub_api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    hub_api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        repo_type="model",
        commit_message="Add Diffused Heads converted from the released TorchScript files",
    )
    return getattr(repo_url, "url", None) or f"https://huggingface.co/{repo_id}"


def convert(
    unet_path: str,
    audio_encoder_path: str,
    output_dir: str,
    dtype: str = "float32",
    verify_models: bool = True,
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    hub_api=None,
    sample_size: int = 128,
    identity_template=None,
    log=print,
) -> ConversionReport:
    """Convert, verify and write the model folder; returns what was measured. Raises `ConversionError`.

    `sample_size` is the frame size the UNet was trained at (128 for the released CREMA-D model); the weights do
    not store it. `identity_template` (a `diffused_heads.faces.IdentityTemplate`, measured on a real frame of the
    training data) is stored with the model, for face preparation. `log` receives the report's lines."""
    if dtype not in DTYPES:
        raise ConversionError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", argument="dtype")
    if not isinstance(sample_size, int) or sample_size < 8 or sample_size % 4:
        raise ConversionError(f"must be a multiple of 4 of at least 8, got {sample_size!r}", argument="sample_size")
    output_dir = check_output_dir(output_dir, overwrite)

    report = ConversionReport()
    unet_module, encoder_module, unet_state, encoder_state = read_released_files(
        unet_path, audio_encoder_path, report, log
    )
    derive_configs(unet_module, encoder_module, unet_state, encoder_state, report, sample_size, log)
    unet, report.unet_tensors = build_unet(unet_state, report.unet_config)
    audio_encoder, report.audio_encoder_tensors = build_audio_encoder(encoder_state, report.audio_encoder_config)
    log(
        f"Placed {report.unet_tensors}/{len(unet_state)} UNet tensors "
        f"({sum(p.numel() for p in unet.parameters()):,} parameters) and "
        f"{report.audio_encoder_tensors}/{len(encoder_state)} audio encoder tensors"
    )
    if verify_models:
        verify(unet_module, encoder_module, unet, audio_encoder, report, log)
    else:
        log("Verification skipped (--no-verify)")
    del unet_module, encoder_module, unet_state, encoder_state

    if dtype != "float32":
        # The audio encoder stays float32: it is small and runs once per clip. (nn.Module.to skips a diffusers
        # warning about float32-only modules, which this UNet does not have.)
        unet = torch.nn.Module.to(unet, DTYPES[dtype])
    report.sha256 = {
        os.path.basename(unet_path): sha256_of(unet_path),
        os.path.basename(audio_encoder_path): sha256_of(audio_encoder_path),
    }
    repo = push_to_hub or output_dir
    write_atomically(
        output_dir,
        lambda folder: write_model_folder(unet, audio_encoder, folder, report, dtype, repo, identity_template),
    )
    log(f"Wrote {output_dir}")
    if push_to_hub:
        log(f"Uploaded to {push_folder(output_dir, push_to_hub, private, hub_api)}")
    return report


def build_parser(prog: str = "convert_checkpoint.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", required=True, help="the released UNet TorchScript file (crema_script.pt)")
    parser.add_argument("--audio-encoder", required=True, help="the released audio encoder file (audio_encoder.pt)")
    parser.add_argument("--output-dir", required=True, help="the diffusers model folder to write")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="dtype of the saved UNet weights (verification always runs in float32)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument(
        "--sample-size",
        type=int,
        default=128,
        help="frame size the UNet was trained at; not stored in the weights (128 for the released CREMA-D model)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip running both models on the same inputs")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    return parser


# The command-line flag of each argument of `convert` that errors name.
FLAGS = {"unet_path": "--unet", "audio_encoder_path": "--audio-encoder"}


def run(args, identity_template=None) -> ConversionReport:
    return convert(
        args.unet,
        args.audio_encoder,
        args.output_dir,
        dtype=args.dtype,
        verify_models=not args.no_verify,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        private=args.private,
        sample_size=args.sample_size,
        identity_template=identity_template,
    )


def main(argv=None) -> int:
    from diffused_heads.cli_utils import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args) and 0, flags=FLAGS)


if __name__ == "__main__":
    sys.exit(main())
