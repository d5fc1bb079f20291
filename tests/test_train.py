"""The training objective, the batch assembly and the training script (tiny models, generated clips)."""

import json
import math
import os
import subprocess

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from scipy.stats import norm

from diffused_heads import dataset, make_dataset, train, training
from diffused_heads.cards import model_card
from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline, audio_window
from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel
from diffused_heads.training import (
    DiffusionObjective,
    StepBatches,
    TrainingFrames,
    collate_samples,
    lip_box_masks,
    plan_batch,
)

from helpers import ROOT, TINY_ENCODER, TINY_UNET, free_port, tiny_pipeline

T = 1000


def cosine_betas_reference(num_steps=T, max_beta=0.999):
    """The squared-cosine schedule written out from its definition (Nichol & Dhariwal 2021)."""
    alpha_bar = lambda s: math.cos((s / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_steps)])


def vlb_reference(eps, v, x0, xt, t, betas):
    """One sample's bound term in bits/dim, in float64 numpy, from the closed forms of q and p."""
    alphas_bar = np.cumprod(1 - betas)
    abar_t = alphas_bar[t]
    abar_prev = alphas_bar[t - 1] if t > 0 else 1.0
    post_var = lambda k: betas[k] * (1 - (alphas_bar[k - 1] if k > 0 else 1.0)) / (1 - alphas_bar[k])  # noqa: E731
    log_post_var = math.log(post_var(t) if t > 0 else post_var(1))
    # Posterior q(x_{t-1} | x_t, x_0) and the model's mean from the predicted x_0.
    c0 = math.sqrt(abar_prev) * betas[t] / (1 - abar_t)
    ct = math.sqrt(1 - betas[t]) * (1 - abar_prev) / (1 - abar_t)
    x0_hat = (xt - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    mu_q, mu_p = c0 * x0 + ct * xt, c0 * x0_hat + ct * xt
    log_var_p = (v + 1) / 2 * math.log(betas[t]) + (1 - v) / 2 * log_post_var
    if t > 0:
        var_q, var_p = math.exp(log_post_var), np.exp(log_var_p)
        kl = 0.5 * (np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1)
        return kl.mean() / math.log(2)
    std = np.exp(0.5 * log_var_p)
    upper, lower = (x0 + 1 / 255 - mu_p) / std, (x0 - 1 / 255 - mu_p) / std
    log_prob = np.where(
        x0 < -0.999,
        norm.logcdf(upper),
        np.where(x0 > 0.999, norm.logsf(lower), np.log(np.maximum(norm.cdf(upper) - norm.cdf(lower), 1e-12))),
    )
    return -log_prob.mean() / math.log(2)


def scheduler():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")


def test_schedule_matches_definition():
    np.testing.assert_allclose(scheduler().betas.double().numpy(), cosine_betas_reference(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("t", [0, 1, 17, 500, 999])
def test_vlb_matches_restatement(t):
    # The schedule's float32 betas are the ones training uses (their precision is checked above).
    betas = scheduler().betas.double().numpy()
    objective = DiffusionObjective(scheduler())
    g = torch.Generator().manual_seed(t)
    x0 = (torch.rand(2, 3, 6, 6, generator=g) * 2 - 1).round(decimals=2)
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the two edge bins of the decoder likelihood
    noise = torch.randn(2, 3, 6, 6, generator=g)
    timesteps = torch.full((2,), t)
    xt = objective.add_noise(x0, noise, timesteps)
    eps = noise + 0.3 * torch.randn(2, 3, 6, 6, generator=g)
    v = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    terms = objective.vlb_terms(torch.cat([eps, v], 1).double(), x0.double(), xt.double(), timesteps)
    for i in range(2):
        expected = vlb_reference(
            eps[i].double().numpy(), v[i].double().numpy(), x0[i].double().numpy(), xt[i].double().numpy(), t, betas
        )
        assert terms[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_vlb_with_v_prediction_uses_the_implied_noise(t):
    betas = scheduler().betas.double().numpy()
    objective = DiffusionObjective(scheduler(), prediction_type="v_prediction")
    g = torch.Generator().manual_seed(t)
    x0 = (torch.rand(1, 3, 5, 5, generator=g) * 2 - 1).double()
    timesteps = torch.full((1,), t)
    xt = objective.add_noise(x0, torch.randn(1, 3, 5, 5, generator=g).double(), timesteps)
    v = torch.randn(1, 3, 5, 5, generator=g).double()
    var_values = torch.rand(1, 3, 5, 5, generator=g).double() * 2 - 1
    terms = objective.vlb_terms(torch.cat([v, var_values], 1), x0, xt, timesteps)
    alpha_bar = np.cumprod(1 - betas)[t]
    eps = math.sqrt(alpha_bar) * v[0].numpy() + math.sqrt(1 - alpha_bar) * xt[0].numpy()
    expected = vlb_reference(eps, var_values[0].numpy(), x0[0].numpy(), xt[0].numpy(), t, betas)
    assert terms[0].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_v_prediction_target_matches_diffusers():
    sched = scheduler()
    objective = DiffusionObjective(sched, prediction_type="v_prediction")
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    timesteps = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        objective.target(x0, noise, timesteps).float(), sched.get_velocity(x0, noise, timesteps), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(DiffusionObjective(sched).target(x0, noise, timesteps), noise)


def test_vlb_trains_only_the_variance():
    objective = DiffusionObjective(scheduler())
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    timesteps = torch.tensor([3, 400])
    output = torch.randn(2, 6, 4, 4, requires_grad=True)
    objective.vlb_terms(output, x0, objective.add_noise(x0, noise, timesteps), timesteps).sum().backward()
    assert output.grad[:, :3].abs().max() == 0
    assert output.grad[:, 3:].abs().max() > 0


def test_loss_weights_and_lip_term():
    objective = DiffusionObjective(scheduler(), vlb_weight=0.5, lip_weight=2.0)
    x0 = torch.zeros(1, 3, 8, 8)
    noise = torch.zeros(1, 3, 8, 8)
    output = torch.zeros(1, 6, 8, 8)
    output[:, :3, 2:4, 2:4] = 1.0  # an error of 1 inside the mouth box only
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:4, 2:4] = 1
    timesteps = torch.tensor([10])
    losses = objective(output, noise, x0, objective.add_noise(x0, noise, timesteps), timesteps, mask)
    assert losses["simple"].item() == pytest.approx(4 / 64)
    assert losses["lip"].item() == pytest.approx(1.0)
    expected = losses["simple"] + 0.5 * losses["vlb"] + 2.0 * losses["lip"]
    assert losses["loss"].item() == pytest.approx(expected.item())


def test_mouth_masks_cover_the_box_with_margin():
    mask = lip_box_masks(torch.tensor([[0.25, 0.5, 0.75, 0.75]]), 128)
    rows, cols = mask[0, 0].nonzero().unbind(1)
    assert (cols.min().item(), cols.max().item()) == (32 - 5, 96 + 5 - 1)
    assert (rows.min().item(), rows.max().item()) == (64 - 5, 96 + 5 - 1)


def level_clip(folder, levels=6, size=2, boxes=True):
    """A prepared dataset of one clip whose frame k is all 40 * k."""
    writer = dataset.ClipWriter(str(folder), "c", levels, size)
    for k in range(levels):
        writer.write_frame(np.full((size, size, 3), 40 * k, np.uint8))
    box = np.array([[0, 0, size / 2, size]] * levels, np.float32) if boxes else None
    writer.close(np.zeros(levels * 640, np.float32), box)
    dataset.write_manifest(str(folder), size, [{"id": "c", "frames": levels, "speaker": "s", "split": "train"}], [])
    return dataset.PreparedDataset(str(folder))


def test_batch_uses_previous_ground_truth_frames_and_identity_at_start(tmp_path):
    samples = TrainingFrames(level_clip(tmp_path), size=2, context=5)
    g = torch.Generator().manual_seed(0)
    seen_start = seen_middle = seen_other_identity = False
    level = lambda x: round((x.flatten()[0].item() + 1) * 127.5 / 40)  # noqa: E731
    for _ in range(60):
        batch = collate_samples([samples[plan] for plan in plan_batch([6], 1, g)])
        target, identity = batch["target"][0], level(batch["identity"][0])
        assert level(batch["x_start"][0]) == target
        older, newer = level(batch["motion"][0, 0]), level(batch["motion"][0, 1])
        assert older == (target - 2 if target >= 2 else identity)
        assert newer == (target - 1 if target >= 1 else identity)
        seen_start |= target == 0
        seen_middle |= target >= 2
        seen_other_identity |= identity != target
        torch.testing.assert_close(batch["boxes"][0], torch.tensor([0.0, 0.0, 0.5, 1.0]))
        assert batch["waveforms"][0].shape == (6 * 640,)
    assert seen_start and seen_middle and seen_other_identity  # the identity is a random frame, not the target
    plans = plan_batch([6], 8, torch.Generator().manual_seed(1), motion_dropout=1.0)
    dropped = collate_samples([samples[plan] for plan in plans])
    assert torch.equal(dropped["motion"][:, 0], dropped["identity"])
    assert torch.equal(dropped["motion"][:, 1], dropped["identity"])


def test_frames_are_resized_to_the_model_and_batches_depend_only_on_the_step(tmp_path):
    samples = TrainingFrames(level_clip(tmp_path, size=8, boxes=False), size=4, context=5)
    sample = samples[(0, 3, 1, False)]
    assert sample["x_start"].shape == (3, 4, 4) and sample["boxes"] is None
    assert int(sample["x_start"][0, 0, 0]) == 120 and int(sample["identity"][0, 0, 0]) == 40
    # A run resumed at step 3 draws what an unbroken run draws from step 3 on; other processes draw otherwise.
    unbroken = list(StepBatches([6, 9], 4, seed=0, process_index=0, start=0, stop=5))
    assert list(StepBatches([6, 9], 4, seed=0, process_index=0, start=3, stop=5)) == unbroken[3:]
    assert list(StepBatches([6, 9], 4, seed=0, process_index=1, start=0, stop=5)) != unbroken


def test_audio_window_is_centred_and_clamped():
    embeddings = torch.arange(10.0)[:, None]
    assert audio_window(embeddings, 0, 5)[:, 0].tolist() == [0, 0, 0, 1, 2]
    assert audio_window(embeddings, 5, 5)[:, 0].tolist() == [3, 4, 5, 6, 7]
    assert audio_window(embeddings, 9, 5)[:, 0].tolist() == [7, 8, 9, 9, 9]


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    unet = DiffusedHeadsUNetModel(**{**TINY_UNET, "dropout": 0.0}).train()
    objective = DiffusionObjective(scheduler())
    g = torch.Generator().manual_seed(0)
    x0 = torch.tanh(torch.randn(4, 3, 16, 16, generator=g))
    identity, motion = x0.flip(0), torch.cat([x0, x0], 1)
    audio = torch.randn(4, 5, TINY_UNET["audio_embedding_dim"], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    timesteps = torch.tensor([50, 200, 400, 700])
    xt = objective.add_noise(x0, noise, timesteps)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    history = []
    for _ in range(40):
        losses = objective(unet(xt, timesteps, identity, motion, audio).sample, noise, x0, xt, timesteps)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert history[-1] < 0.25 * history[0], history


# --------------------------------------------------------------------------------------------------
# The script


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    args = [
        "--output",
        str(folder),
        "--num-clips",
        "2",
        "--size",
        "16",
        "--max-seconds",
        "1.0",
        "--speech",
        "synthetic",
    ]
    assert make_dataset.main(args) == 0
    return folder


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps({"unet": TINY_UNET, "audio_encoder": TINY_ENCODER}))
    return path


def run(clip_folder, output, *extra):
    args = [
        "--data",
        str(clip_folder),
        "--output-dir",
        str(output),
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--learning-rate",
        "1e-3",
        "--threads",
        "2",
        *extra,
    ]
    return train.main(args)


def weights(folder):
    return {
        **load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")),
        **{
            "enc." + k: v
            for k, v in load_file(os.path.join(folder, "audio_encoder", "diffusion_pytorch_model.safetensors")).items()
        },
    }


def test_resume_continues_where_it_stopped(clip_folder, tiny_config, tmp_path):
    common = ["--config", str(tiny_config), "--train-audio-encoder"]
    assert run(clip_folder, tmp_path / "straight", "--max-steps", "4", *common) == 0
    assert run(clip_folder, tmp_path / "split", "--max-steps", "2", *common) == 0
    assert run(clip_folder, tmp_path / "split", "--max-steps", "4", "--resume", "latest", *common) == 0
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    log = [json.loads(line) for line in open(tmp_path / "split-checkpoints" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and "vlb" in r and "lip" in r for r in log)
    # Only the newest checkpoints are kept.
    found = sorted(os.listdir(tmp_path / "split-checkpoints"))
    assert found == ["checkpoint-2", "checkpoint-4", "data", "train_log.jsonl"]


def test_result_loads_in_the_pipeline(clip_folder, tiny_config, tmp_path):
    assert (
        run(
            clip_folder,
            tmp_path / "model",
            *("--max-steps", "2", "--config", str(tiny_config), "--train-audio-encoder"),
            *("--prediction-type", "v_prediction"),
        )
        == 0
    )
    pipe = DiffusedHeadsPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(np.zeros((16, 16, 3), np.uint8), np.zeros(3200, np.float32), num_inference_steps=2)
    assert out.frames.shape == (1, 5, 16, 16, 3)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # The longest clip made by the fixture (--max-seconds 1.0) is what the model knows.
    assert 0.5 <= pipe.config.trained_clip_seconds <= 1.0
    # A new model's card: the Hub's header, a licence left for its owner to set, how it was made.
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "other" and card.data.base_model is None
    assert "trained from scratch" in card.text and "| optimisation steps | 2 of batch" in card.text
    # Its picture: 8 frames made (tiles of 96 px for a 16 px model) above the first clip's own.
    assert "## Sample frames" in card.text and "(samples.png)" in card.text
    sheet = np.asarray(PIL.Image.open(tmp_path / "model" / "samples.png"))
    assert sheet.shape == (2 * 96, 8 * 96, 3)
    data = dataset.PreparedDataset(str(tmp_path / "model-checkpoints" / "data"))
    real = np.asarray(PIL.Image.fromarray(data.frame(data.clips[0], 3)).resize((96, 96), PIL.Image.BICUBIC))
    np.testing.assert_array_equal(sheet[96:, 3 * 96 : 4 * 96], real)


def recorded_run(monkeypatch, clip_folder, output, *extra):
    """Run the training script in one process, recording the data it opens, the batches it makes and what the
    UNet receives."""
    record = {"data": None, "batches": [], "unet_inputs": []}
    real_open, real_collate = training.open_data, training.collate_samples
    real_forward = DiffusedHeadsUNetModel.forward

    def open_data(*args, **kwargs):
        record["data"] = real_open(*args, **kwargs)
        return record["data"]

    def collate(*args, **kwargs):
        record["batches"].append(real_collate(*args, **kwargs))
        return record["batches"][-1]

    def forward(self, sample, timestep, identity_frame, motion_frames, audio_context, **kwargs):
        record["unet_inputs"].append(
            {
                "identity": identity_frame.detach().clone(),
                "motion": motion_frames.detach().clone(),
                "audio": audio_context.detach().clone(),
            }
        )
        return real_forward(self, sample, timestep, identity_frame, motion_frames, audio_context, **kwargs)

    monkeypatch.setattr(training, "open_data", open_data)
    monkeypatch.setattr(training, "collate_samples", collate)
    monkeypatch.setattr(DiffusedHeadsUNetModel, "forward", forward)
    # (no sample frames: the UNet calls recorded are the training steps' only)
    assert run(clip_folder, output, "--num-workers", "0", "--sample-frames", "0", *extra) == 0
    assert len(record["batches"]) == len(record["unet_inputs"]) > 0
    return record


def test_unet_gets_the_audio_window_of_the_target_frame(clip_folder, tmp_path, monkeypatch):
    start = tmp_path / "start"
    tiny_pipeline().save_pretrained(start, model_card=model_card(license="cc-by-nc-sa-4.0"))
    extra = ("--max-steps", "3", "--init-from", str(start), "--ema-decay", "0", "--batch-size", "3")
    record = recorded_run(monkeypatch, clip_folder, tmp_path / "tuned", *extra)
    encoder = DiffusedHeadsPipeline.from_pretrained(start).audio_encoder  # frozen during training
    data = record["data"]
    with torch.no_grad():
        embeddings = [encoder(torch.from_numpy(data.audio(c))[None]).audio_embeddings[0] for c in data.clips]
    for batch, inputs in zip(record["batches"], record["unet_inputs"]):
        expected = torch.stack([audio_window(embeddings[c], t, 5) for c, t in zip(batch["clip"], batch["target"])])
        torch.testing.assert_close(inputs["audio"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(inputs["identity"], batch["identity"])


def test_full_motion_dropout_gives_the_unet_the_identity_as_motion_frames(
    clip_folder, tiny_config, tmp_path, monkeypatch
):
    extra = ("--max-steps", "2", "--config", str(tiny_config), "--train-audio-encoder", "--motion-dropout", "1.0")
    record = recorded_run(monkeypatch, clip_folder, tmp_path / "model", *extra)
    for inputs in record["unet_inputs"]:
        identity, motion = inputs["identity"], inputs["motion"]
        assert torch.equal(motion[:, :3], identity) and torch.equal(motion[:, 3:], identity)


@pytest.mark.parametrize("ema_decay", ["0.9", "0"])
def test_saved_pipeline_holds_the_ema_weights(ema_decay, clip_folder, tiny_config, tmp_path):
    extra = ("--max-steps", "2", "--config", str(tiny_config), "--train-audio-encoder", "--ema-decay", ema_decay)
    assert run(clip_folder, tmp_path / "model", *extra) == 0
    checkpoint = tmp_path / "model-checkpoints" / "checkpoint-2"
    # The UNet and the audio encoder (trained jointly here): each saved with its EMA weights.
    for component, raw_file in (("unet", "model.safetensors"), ("audio_encoder", "model_1.safetensors")):
        saved = load_file(tmp_path / "model" / component / "diffusion_pytorch_model.safetensors")
        raw = load_file(checkpoint / raw_file)  # the trained weights
        assert saved.keys() == raw.keys(), component
        differing = [k for k in saved if not torch.equal(saved[k], raw[k])]
        if ema_decay == "0":
            assert differing == [], component
        else:  # EMA of 2 steps: between the start and the trained weights
            assert len(differing) > len(saved) // 2, component
    # The saved scheduler of a new model is the released sampler's (the repository's config).
    saved = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    repository = json.loads(open(os.path.join(ROOT, "scheduler", "scheduler_config.json")).read())
    repository.pop("_diffusers_version")
    assert {k: saved[k] for k in repository} == repository


def test_audio_encoder_is_frozen_by_default(clip_folder, tmp_path):
    start = tmp_path / "start"
    tiny_pipeline().save_pretrained(start, model_card=model_card(license="cc-by-nc-sa-4.0"))
    assert run(clip_folder, tmp_path / "tuned", "--max-steps", "2", "--init-from", str(start), "--ema-decay", "0") == 0
    before, after = weights(start), weights(tmp_path / "tuned")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("enc."))
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("enc."))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "builtin"], "untrained audio encoder"),
        (["--train-audio-encoder", "--resume", "latest"], "no checkpoint"),
        (["--init-from", "/nonexistent/model"], "could not be loaded"),
    ],
)
def test_errors_are_one_line(clip_folder, tmp_path, capsys, extra, message):
    assert run(clip_folder, tmp_path / "out", "--max-steps", "1", *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_missing_data_folder(tmp_path, capsys):
    assert (
        train.main(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o"), "--train-audio-encoder"])
        == 1
    )
    assert "does not exist" in capsys.readouterr().err


def test_worker_processes_read_what_the_training_process_reads(clip_folder, tiny_config, tmp_path):
    common = ["--max-steps", "3", "--config", str(tiny_config), "--train-audio-encoder", "--ema-decay", "0"]
    assert run(clip_folder, tmp_path / "inline", "--num-workers", "0", *common) == 0
    assert run(clip_folder, tmp_path / "workers", "--num-workers", "2", *common) == 0
    inline, workers = weights(tmp_path / "inline"), weights(tmp_path / "workers")
    for key in inline:
        torch.testing.assert_close(workers[key], inline[key], rtol=0, atol=0, msg=key)


def test_decoder_only_fine_tuning_leaves_the_rest_of_the_unet(clip_folder, tmp_path):
    start = tmp_path / "start"
    tiny_pipeline().save_pretrained(start, model_card=model_card(license="cc-by-nc-sa-4.0"))
    extra = ("--max-steps", "2", "--init-from", str(start), "--ema-decay", "0.9", "--train-layers", "decoder")
    assert run(clip_folder, tmp_path / "tuned", *extra) == 0
    before, after = weights(start), weights(tmp_path / "tuned")
    decoder = ("up_blocks.", "conv_norm_out.", "conv_out.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(decoder) for k in changed)
    assert any(k.startswith("up_blocks.0.") for k in changed)
    card = ModelCard.load(tmp_path / "tuned" / "README.md")  # a fine-tune keeps its starting model's licence
    assert card.data.license == "cc-by-nc-sa-4.0" and "fine-tuned" in card.data.tags and str(start) in card.text


def test_the_build_script_writes_the_shipped_model_configs(tmp_path):
    """make_builtin_model.sh's training command, run up to the saving (no training), writes the configurations
    of the shipped built-in teacher (builtin-ddpm): its defaults (steps, stabilisation, sampling variance)
    included."""
    import shlex

    from diffused_heads import builtin_model_path
    from diffused_heads.train import parse_args
    from diffused_heads.training import ModelStart, build_components, pipeline_to_save

    with open(os.path.join(ROOT, "make_builtin_model.sh"), encoding="utf-8") as f:
        script = f.read().replace("\\\n", " ")
    [line] = [line for line in script.splitlines() if line.startswith("diffused-heads train ")]
    args = parse_args(shlex.split(line)[2:])
    start = ModelStart(**{name: getattr(args, name) for name in ModelStart.__dataclass_fields__})
    unet, encoder, scheduler, defaults = build_components(start)
    # The longest clip of the data: make-dataset's default --max-seconds, which the script keeps.
    saved = pipeline_to_save(
        unet,
        encoder,
        scheduler,
        defaults,
        longest_clip=3.2,
        sampling_variance=args.sampling_variance,
        stabilize_every=args.stabilize_every,
        num_inference_steps=args.inference_steps,
    )
    saved.save_pretrained(tmp_path)
    for name in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "audio_encoder/config.json",
    ):
        built, shipped = (
            json.loads(open(os.path.join(folder, name)).read())
            for folder in (tmp_path, builtin_model_path("builtin-ddpm"))
        )
        built.pop("_diffusers_version"), shipped.pop("_diffusers_version")
        assert built == shipped, name


LOSS_PER_PROCESS = """
import sys, types, torch
from diffused_heads.training import LoopSettings, make_accelerator, training_loop

accelerator = make_accelerator()
rank = accelerator.process_index


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        frame = torch.zeros(3, 2, 2, dtype=torch.uint8)
        return {"clip": 0, "target": 0, "x_start": frame, "identity": frame, "motion": frame[None], "boxes": None,
                "audio": torch.zeros(1)}


def losses(batch, generator, models):  # each process's own known losses: rank + 1 and 10 (rank + 1)
    zero = models["model"](torch.ones(1, 1)).sum() * 0
    return {"loss": zero + rank + 1.0, "mse": zero + 10.0 * (rank + 1)}


settings = LoopSettings(checkpoint_dir=sys.argv[1], max_steps=2, batch_size=1, ema_decay=0, log_every=1)
data = types.SimpleNamespace(clips=[types.SimpleNamespace(frames=40)])
training_loop(settings, accelerator, {"model": torch.nn.Linear(1, 1)}, data, Samples(), losses)
"""


@pytest.mark.slow
def test_the_logged_losses_are_the_mean_over_the_processes_and_each_saves_its_random_state(tmp_path):
    """Two processes whose losses are known (1 and 2; 10 and 20): the log holds their means, not the main
    process's own; and every process saves its checkpoint (accelerate writes each process's random states, which
    a resumed run's dropout needs)."""
    script = tmp_path / "loss_per_process.py"
    script.write_text(LOSS_PER_PROCESS)
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    (tmp_path / "run").mkdir()
    result = subprocess.run([*command, str(script), str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert [(r["step"], r["loss"], r["mse"]) for r in log] == [(1, 1.5, 15.0), (2, 1.5, 15.0)]
    saved = os.listdir(tmp_path / "run" / "checkpoint-2")
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(saved), saved


def test_report_to_tensorboard_logs_the_same_losses_as_the_json_log(clip_folder, tiny_config, tmp_path):
    """`--report-to tensorboard` (accelerate's tracker, as diffusers' training examples have it): every logged
    value of train_log.jsonl is in the TensorBoard log at its step, under its own name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--config", str(tiny_config), "--train-audio-encoder", "--max-steps", "2", "--report-to", "tensorboard"]
    assert run(clip_folder, tmp_path / "out", *common) == 0
    log = [json.loads(line) for line in open(tmp_path / "out-checkpoints" / "train_log.jsonl")]
    # (accelerate's TensorBoard tracker writes the run's settings to a folder of their own beside the scalars)
    boards = [EventAccumulator(root) for root, _, names in os.walk(tmp_path / "out-checkpoints" / "logs") if names]
    [board] = [b for b in boards if "loss" in b.Reload().Tags()["scalars"]]
    for name in ("loss", "vlb", "lr"):
        logged = [(e.step, e.value) for e in board.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in log], name


def test_report_to_a_tracker_that_is_not_installed_names_the_package(clip_folder, tiny_config, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    common = ["--config", str(tiny_config), "--train-audio-encoder", "--max-steps", "1", "--report-to", "wandb"]
    assert run(clip_folder, tmp_path / "out", *common) == 1
    assert "--report-to wandb needs wandb: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
