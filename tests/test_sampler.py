"""The DDPM configuration against an independent restatement of the released sampler (REFERENCE §4)."""

import math

import numpy as np
import torch

from helpers import ddpm_scheduler, tiny_pipeline


def released_schedule(num_steps):
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)])
    cumprod = np.cumprod(1 - betas)
    timesteps = [round(k * 999 / (num_steps - 1)) for k in range(num_steps)]
    spaced, last = [], 1.0
    for t in timesteps:
        spaced.append(1 - cumprod[t] / last)
        last = cumprod[t]
    beta = np.array(spaced)
    abar = np.cumprod(1 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    return dict(
        timesteps=timesteps,
        log_beta=np.log(beta),
        log_beta_tilde=np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]])),
        x0_coef=(np.sqrt(1 / abar), np.sqrt(1 / abar - 1)),
        mean_coef=(beta * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)),
    )


def fake_network(x, t):
    """A deterministic stand-in for the UNet: noise and variance values that depend on x and t."""
    eps = np.tanh(0.7 * x + t / 1000.0)
    v = 0.9 * np.sin(x + t / 300.0)
    return eps, v


def released_sample(x_T, noises, num_steps):
    s = released_schedule(num_steps)
    x = x_T.astype(np.float64)
    for j in reversed(range(num_steps)):
        t = s["timesteps"][j]
        eps, v = fake_network(x, t)
        frac = (v + 1) / 2
        logvar = frac * s["log_beta"][j] + (1 - frac) * s["log_beta_tilde"][j]
        x0 = np.clip(s["x0_coef"][0][j] * x - s["x0_coef"][1][j] * eps, -1, 1)
        mean = s["mean_coef"][0][j] * x0 + s["mean_coef"][1][j] * x
        x = mean + (np.exp(logvar / 2) * noises[j] if t > 0 else 0.0)
    return x


def test_ddpm_scheduler_reproduces_the_released_sampler():
    num_steps = 100
    scheduler = ddpm_scheduler()
    scheduler.set_timesteps(num_steps)
    assert scheduler.timesteps.tolist() == released_schedule(num_steps)["timesteps"][::-1]

    shape = (2, 3, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # The scheduler draws its noise from the generator at every step but the last, in this order.
    draws = torch.Generator().manual_seed(1)
    noise_by_index = {}
    for j in reversed(range(1, num_steps)):
        noise_by_index[j] = torch.randn(shape, generator=draws).numpy()

    generator = torch.Generator().manual_seed(1)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps, v = fake_network(x.numpy().astype(np.float64), int(t))
        model_output = torch.cat([torch.from_numpy(eps), torch.from_numpy(v)], dim=1).float()
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample

    expected = released_sample(x_T.numpy(), noise_by_index, num_steps)
    assert np.abs(x.numpy() - expected).max() < 2e-4
    # The noise really was used (a run with other noise lands elsewhere).
    other = released_sample(x_T.numpy(), {j: -n for j, n in noise_by_index.items()}, num_steps)
    assert np.abs(other - expected).max() > 1e-2


def test_the_callers_scheduler_options_win_over_the_tools_own_settings():
    """DDIM is made with trailing spacing and DPM-Solver as dpmsolver++ unless the caller (evaluate's
    --scheduler-option) says otherwise."""
    from diffused_heads import runtime

    config = ddpm_scheduler().config
    assert runtime.make_scheduler("ddim", config).config.timestep_spacing == "trailing"
    assert runtime.make_scheduler("ddim", config, timestep_spacing="linspace").config.timestep_spacing == "linspace"
    assert runtime.make_scheduler("dpmsolver", config).config.algorithm_type == "dpmsolver++"
    chosen = runtime.make_scheduler("dpmsolver", config, algorithm_type="sde-dpmsolver++")
    assert chosen.config.algorithm_type == "sde-dpmsolver++"
    pipe = tiny_pipeline()
    assert (
        runtime.with_scheduler(pipe, "ddim", timestep_spacing="leading").scheduler.config.timestep_spacing == "leading"
    )


def test_retrieve_timesteps_follows_diffusers_convention():
    """As diffusers' pipelines' `retrieve_timesteps`: the scheduler is set, its timesteps and their number come
    back, and custom timesteps that a scheduler cannot take are refused by name."""
    import pytest
    from diffusers import DDIMScheduler, DDPMScheduler

    from diffused_heads.hub.pipeline_diffused_heads import retrieve_timesteps

    ddpm = DDPMScheduler(num_train_timesteps=1000)
    timesteps, steps = retrieve_timesteps(ddpm, timesteps=[999, 499, 0])
    assert timesteps.tolist() == [999, 499, 0] and steps == 3 and ddpm.timesteps is timesteps
    timesteps, steps = retrieve_timesteps(ddpm, 4)  # "leading" spacing: 1000 // 4 apart, from 0
    assert timesteps.tolist() == [750, 500, 250, 0] and steps == 4
    with pytest.raises(ValueError, match="DDIMScheduler does not take custom timesteps"):
        retrieve_timesteps(DDIMScheduler(num_train_timesteps=1000), timesteps=[999, 499])
