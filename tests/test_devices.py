"""Tensors on the wrong device, found without a GPU: the training set-up is run with PyTorch's `meta` device as the
run's device, so whatever it leaves on the CPU is on the wrong device, as it would be beside a GPU."""

import copy
import types

import pytest
import torch

from diffused_heads import training
from diffused_heads.training import LoopSettings, prepare_run, tensors_off_device

from helpers import tiny_unet


class MetaAccelerator:
    """accelerate's `Accelerator` as the training set-up uses it, with `meta` as the run's device: `prepare` moves
    the models there, and `load_state` puts the registered objects' states back from the CPU, as accelerate's does."""

    device = torch.device("meta")
    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self):
        self.registered = []

    def prepare(self, *objects):
        return tuple(o.to(self.device) if isinstance(o, torch.nn.Module) else o for o in objects)

    def register_for_checkpointing(self, obj):
        self.registered.append(obj)

    def load_state(self, folder):
        for obj in self.registered:
            state = obj.state_dict()
            if "shadow_params" in state:  # an EMA: its weights come back on the CPU
                state["shadow_params"] = [torch.zeros(t.shape) for t in state["shadow_params"]]
            obj.load_state_dict(state)

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        pass


@pytest.fixture(autouse=True)
def accelerate_state():
    """The set-up seeds through accelerate's `set_seed`, which reads the process index from accelerate's shared
    state, as a real run's `Accelerator` sets it; it is reset afterwards for the commands that other tests run in
    this process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)
    yield
    AcceleratorState._reset_state(True)


def models():
    teacher = tiny_unet(1).requires_grad_(False)
    return {"unet": tiny_unet(0), "teacher": teacher}


def settings(tmp_path, **kwargs):
    return LoopSettings(checkpoint_dir=str(tmp_path), ema_decay=0.9, **kwargs)


@pytest.mark.parametrize("ema_targets", [False, True])
def test_after_the_set_up_every_tensor_of_the_run_is_on_the_runs_device(tmp_path, ema_targets):
    run = prepare_run(settings(tmp_path), MetaAccelerator(), models(), ema_targets=ema_targets)
    assert tensors_off_device(run, "meta") == []
    assert all(t.device.type == "meta" for t in run.emas["unet"].shadow_params)
    assert all(p.device.type == "meta" for p in run.models["teacher"].parameters())
    if ema_targets:
        assert all(p.device.type == "meta" for p in run.targets["unet_target"].parameters())


def test_the_set_up_seeds_every_generator_per_process(tmp_path):
    """accelerate's `set_seed(seed, device_specific=True)`: torch, numpy and random seeded with the seed plus the
    process index (0 here), so seed 7 gives 7 (not, say, 7000)."""
    import random

    import numpy as np

    prepare_run(settings(tmp_path, seed=7), MetaAccelerator(), models())
    assert torch.initial_seed() == 7
    assert np.random.get_state()[1][0] == 7  # MT19937's first word is the seed
    random_after = random.random()
    random.seed(7)
    assert random.random() == random_after


def test_a_resumed_run_moves_the_restored_ema_weights_to_the_runs_device(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    run = prepare_run(settings(tmp_path, resume="latest"), MetaAccelerator(), models())
    assert run.resume_from.endswith("checkpoint-5")
    assert all(t.device.type == "meta" for t in run.emas["unet"].shadow_params)


def test_what_is_off_the_device_is_named():
    """A run with one EMA weight and one frozen model's buffer left on the CPU: both are named, nothing else."""
    unet = torch.nn.Linear(2, 2).to("meta")
    frozen = torch.nn.BatchNorm1d(2).to("meta")
    frozen.register_buffer("left_behind", torch.zeros(1))
    ema = types.SimpleNamespace(shadow_params=[torch.zeros(2, 2, device="meta"), torch.zeros(2)])
    optimizer = torch.optim.AdamW(unet.parameters())
    run = training.PreparedRun(
        {"unet": unet, "frozen": frozen}, ["unet"], [], {"unet": ema}, {}, optimizer, None, None, None
    )
    assert tensors_off_device(run, "meta") == ["frozen buffer left_behind (cpu)", "unet EMA weight 1 (cpu)"]
    assert tensors_off_device(copy.copy(run), "cpu")[:1] == ["unet parameter weight (meta)"]
