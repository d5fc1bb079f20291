import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from test_sampler import released_schedule

from diffused_heads.hub import convert_checkpoint
from diffused_heads.hub.convert_checkpoint import convert, derive_audio_encoder_config, derive_unet_config, main
from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel

from helpers import ROOT, read_manifest, speech_like
from original_model import as_if_traced_on, scripted_audio_encoder, traced_unet

TINY_ORIGINAL_UNET = dict(channels=16, mult=(1, 2), blocks=1, attn_levels=(1,), head_dim=8, groups=4, audio_in=40)
TINY_ORIGINAL_ENCODER = dict(
    channels=(4, 8), kernels=(80, 4), strides=(16, 2), paddings=(32, 1), code=8, final_kernel=100, hidden=8, layers=2
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    unet = traced_unet(folder / "crema_script.pt", size=128, **TINY_ORIGINAL_UNET)
    encoder = scripted_audio_encoder(folder / "audio_encoder.pt", **TINY_ORIGINAL_ENCODER)
    return folder, unet, encoder


def run_convert(released, out, **kwargs):
    folder = released[0]
    messages = []
    report = convert(
        str(folder / "crema_script.pt"), str(folder / "audio_encoder.pt"), str(out), log=messages.append, **kwargs
    )
    return report, messages


def test_conversion_places_every_tensor_and_matches(released, tmp_path):
    report, messages = run_convert(released, tmp_path / "model")
    assert report.unet_tensors == len(released[1].state_dict())
    assert report.audio_encoder_tensors == len(released[2].state_dict())
    assert report.unet_config["attention_head_dim"] == 8
    assert report.unet_config["block_out_channels"] == (16, 32)
    assert report.unet_config["attention_levels"] == (False, True)
    assert report.audio_encoder_config["conv_strides"] == (16, 2)
    for name in ("unet", "audio_encoder"):
        assert report.verification[name]["max_rel"] < 1e-5, report.verification
    assert any("max rel diff" in m for m in messages)

    out = tmp_path / "model"
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and "library_name: diffusers" in card and "2301.03396" in card
    assert report.sha256["crema_script.pt"] in card
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary folders left behind"
    # The folder's scheduler is the released sampler, as the repository's own config states it.
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    repository = json.loads(open(os.path.join(ROOT, "scheduler", "scheduler_config.json")).read())
    for config in (saved, repository):
        config.pop("_diffusers_version")
    assert {k: saved[k] for k in repository} == repository


def reference_frames(unet, encoder, identity, waveform, latents, seed, steps):
    """The released sampler (REFERENCE §4), restated with the TorchScript modules: per frame, DDPM over `steps`
    respaced steps with the learned-range variance, the two previous frames as motion, five audio embeddings
    around the frame from the encoder run one 3200-sample window per call (its GRU state carried)."""
    schedule = released_schedule(steps)
    num_frames = latents.shape[1]
    padded = torch.nn.functional.pad(torch.from_numpy(waveform), (1280, 1280))
    state, embeddings = torch.zeros(2, 1, 8), []
    with torch.no_grad():
        for i in range(num_frames):
            window = padded[i * 640 : i * 640 + 3200]
            embedding, _, state = encoder(window.reshape(1, 1, -1), torch.LongTensor([3200]), init_state=state)
            embeddings.append(embedding.reshape(-1))
        generator = torch.Generator().manual_seed(seed)
        previous, frames = [identity, identity], []
        for i in range(num_frames):
            audio = torch.stack([embeddings[min(max(i + o, 0), num_frames - 1)] for o in range(-2, 3)])[None]
            x = latents[:, i]
            for j in reversed(range(steps)):  # in float32, as the original (coefficients from float64, cast)
                t = schedule["timesteps"][j]
                out = unet(x, torch.tensor([t]), identity, torch.cat(previous, 1), audio)
                eps, v = out[:, :3], out[:, 3:]
                c = {k: [float(a[j]) for a in v] if isinstance(v, tuple) else float(v[j]) for k, v in schedule.items()}
                frac = (v + 1) / 2
                logvar = frac * c["log_beta"] + (1 - frac) * c["log_beta_tilde"]
                x0 = (c["x0_coef"][0] * x - c["x0_coef"][1] * eps).clamp(-1, 1)
                mean = c["mean_coef"][0] * x0 + c["mean_coef"][1] * x
                noise = torch.randn(x.shape, generator=generator) if t > 0 else 0.0
                x = mean + torch.exp(logvar / 2) * noise
            previous = [previous[1], x]
            frames.append(((x + 1) / 2).clamp(0, 1))
    return torch.stack(frames, 1)[0].permute(0, 2, 3, 1).numpy()


def test_the_converted_pipeline_makes_the_original_samplers_frames(released, tmp_path):
    run_convert(released, tmp_path / "model")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    identity_image = np.random.RandomState(0).randint(0, 256, (128, 128, 3), dtype=np.uint8)
    waveform = speech_like(0.12)  # 3 frames
    latents = torch.randn((1, 3, 3, 128, 128), generator=torch.Generator().manual_seed(2))
    ours = pipe(
        identity_image, waveform, num_inference_steps=3, latents=latents, generator=torch.Generator().manual_seed(7)
    ).frames[0]
    unet = torch.jit.load(str(released[0] / "crema_script.pt"))
    encoder = torch.jit.load(str(released[0] / "audio_encoder.pt"))
    identity = torch.from_numpy(identity_image).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = reference_frames(unet, encoder, identity, waveform, latents, seed=7, steps=3)
    assert ours.shape == expected.shape == (3, 128, 128, 3)
    # At t = 999 the clean-frame estimate multiplies the noise estimate by ~2e4, so the last float bits of the two
    # UNets show at the odd pixel whose estimate is not clipped.
    difference = np.abs(ours - expected)
    assert difference.max() < 1e-2 and (difference > 1e-3).mean() < 1e-4, (difference.max(), (difference > 1e-3).sum())
    assert np.abs(ours[2] - ours[0]).max() > 0.05  # the frames are not all alike: the test sees the loop


def test_converted_unet_equals_the_original_module(released, tmp_path):
    """Direct parity with the (eager) original, also for a batch and other timesteps."""
    run_convert(released, tmp_path / "model", verify_models=False)
    unet = DiffusedHeadsUNetModel.from_pretrained(tmp_path / "model" / "unet").eval()
    g = torch.Generator().manual_seed(3)
    args = (
        torch.randn(2, 3, 128, 128, generator=g),
        torch.tensor([999, 0]),
        torch.rand(2, 3, 128, 128, generator=g),
        torch.rand(2, 6, 128, 128, generator=g),
        torch.randn(2, 5, 8, generator=g),
    )
    with torch.no_grad():
        torch.testing.assert_close(unet(*args).sample, released[1](*args), atol=1e-4, rtol=1e-4)


def test_half_precision_is_verified_in_float32_then_cast(released, tmp_path):
    report, _ = run_convert(released, tmp_path / "model", dtype="bfloat16")
    assert report.verification["unet"]["max_rel"] < 1e-5
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    encoder = load_file(tmp_path / "model" / "audio_encoder" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in encoder.values() if t.is_floating_point()} == {torch.float32}


def test_wrong_attention_layout_fails_verification_and_writes_nothing(released, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_checkpoint, "legacy_qkv_to_grouped", lambda t, d: t)
    monkeypatch.setattr(convert_checkpoint, "attention_head_dim_from_module", lambda *a: 8)
    with pytest.raises(convert_checkpoint.ConversionError, match="verification failed for unet"):
        run_convert(released, tmp_path / "model")
    assert os.listdir(tmp_path) == []


def test_config_from_the_full_crema_manifest_equals_the_defaults():
    state = {key: torch.empty(shape, device="meta") for key, shape in read_manifest("crema_unet_state_dict.tsv")}
    encoder_state = {
        key: torch.empty(shape, device="meta") for key, shape in read_manifest("audio_encoder_state_dict.tsv")
    }
    encoder_config = derive_audio_encoder_config(encoder_state)
    config = derive_unet_config(state, audio_embedding_dim=encoder_config["hidden_size"])
    with torch.device("meta"):
        default = DiffusedHeadsUNetModel()
        derived = DiffusedHeadsUNetModel(**config)
    assert derived.to_json_string() == default.to_json_string()
    from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder

    assert DiffusedHeadsAudioEncoder(**encoder_config).to_json_string() == DiffusedHeadsAudioEncoder().to_json_string()
    # Every released tensor lands in exactly one tensor of the same size.
    converted = convert_checkpoint.convert_unet_state_dict(state, config)
    assert len(converted) == len(state) == 324
    expected = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_push_to_hub_sends_the_folder_to_the_repository(released, tmp_path):
    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, **kwargs):
            self.calls.append(("create_repo", kwargs))
            return type("RepoUrl", (), {"url": f"https://huggingface.co/{kwargs['repo_id']}"})()

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))

    api = FakeApi()
    _, messages = run_convert(
        released,
        tmp_path / "model",
        push_to_hub="someone/diffused-heads",
        private=True,
        hub_api=api,
        verify_models=False,
    )
    assert api.calls[0] == ("create_repo", {"repo_id": "someone/diffused-heads", "private": True, "exist_ok": True})
    name, kwargs, files = api.calls[1]
    assert name == "upload_folder" and kwargs["repo_id"] == "someone/diffused-heads"
    assert kwargs["folder_path"] == str(tmp_path / "model")
    assert "model_index.json" in files and "unet" in files and "README.md" in files
    assert "https://huggingface.co/someone/diffused-heads" in messages[-1]
    assert "someone/diffused-heads" in (tmp_path / "model" / "README.md").read_text()


def _cli(released, out, unet=None, encoder=None, extra=()):
    folder = released[0]
    return main(
        [
            "--unet",
            str(unet or folder / "crema_script.pt"),
            "--audio-encoder",
            str(encoder or folder / "audio_encoder.pt"),
            "--output-dir",
            str(out),
            *extra,
        ]
    )


def _bad_file(tmp_path, kind, released):
    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"time_embed.fc.0.weight": [1, 2, 3]}))
    elif kind == "torch_save":
        buffer = io.BytesIO()
        torch.save({"weight": torch.zeros(3)}, buffer)
        path.write_bytes(buffer.getvalue())
    elif kind == "truncated":
        data = (released[0] / "crema_script.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "file not found"),
        ("random", "not a TorchScript archive"),
        ("pickle", "not a TorchScript archive"),
        ("empty", "not a TorchScript archive"),
        ("torch_save", "not TorchScript"),
        ("truncated", "not a TorchScript archive"),
        ("swapped", "speech encoder, not the UNet"),
    ],
)
def test_bad_source_files_give_one_line_errors(case, message, released, tmp_path, capsys):
    if case == "missing":
        unet = tmp_path / "nowhere.pt"
    elif case == "swapped":
        unet = released[0] / "audio_encoder.pt"
    else:
        unet = _bad_file(tmp_path, case, released)
    out = tmp_path / "out"
    assert _cli(released, out, unet=unet) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_overwrite(released, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli(released, out, extra=["--no-verify"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert _cli(released, out, extra=["--no-verify", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert json.loads((out / "model_index.json").read_text())["unet"] == [
        "unet_diffused_heads",
        "DiffusedHeadsUNetModel",
    ]


def test_unusable_output_locations_are_reported(released, tmp_path, capsys):
    assert _cli(released, tmp_path / "no" / "such" / "parent", extra=["--no-verify"]) == 1
    assert "does not exist" in capsys.readouterr().err
    regular = tmp_path / "regular-file"
    regular.write_text("not a folder")
    assert _cli(released, regular / "out", extra=["--no-verify"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output-dir: {regular} is a file, not a folder"
    assert sorted(os.listdir(tmp_path)) == ["regular-file"]


@pytest.mark.parametrize("failure", ["verification", "writing"])
def test_failed_conversion_with_overwrite_keeps_the_old_folder(failure, released, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if failure == "verification":
        monkeypatch.setattr(convert_checkpoint, "legacy_qkv_to_grouped", lambda t, d: t)
        monkeypatch.setattr(convert_checkpoint, "attention_head_dim_from_module", lambda *a: 8)
    else:

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(convert_checkpoint, "write_model_folder", disk_full)
    assert _cli(released, out, extra=["--overwrite"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_output_folder_gets_the_mode_mkdir_would_give(released, tmp_path):
    previous = os.umask(0o027)
    try:
        assert _cli(released, tmp_path / "out", extra=["--no-verify"]) == 0
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o750


# --- files made on a GPU or saved in training mode ---


def _unet_example(size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 3, size, size, generator=g),
        torch.tensor([500]),
        torch.randn(1, 3, size, size, generator=g),
        torch.randn(1, 6, size, size, generator=g),
        torch.randn(1, 5, 8, generator=g),
    )


def test_a_trace_made_on_a_gpu_converts_and_verifies_on_the_cpu(released, tmp_path):
    folder = tmp_path / "gpu"
    folder.mkdir()
    traced_unet(folder / "crema_script.pt", size=128, **TINY_ORIGINAL_UNET)
    as_if_traced_on(folder / "crema_script.pt", "cuda:0")
    (folder / "audio_encoder.pt").write_bytes((released[0] / "audio_encoder.pt").read_bytes())
    # The file as it is cannot run here: its code sends tensors to the GPU.
    with pytest.raises(Exception):
        torch.jit.load(str(folder / "crema_script.pt"), map_location="cpu")(*_unet_example())
    report, messages = run_convert((folder,), tmp_path / "model")
    assert report.source["unet"]["traced_on"] == "cuda:0" and report.source["audio_encoder"]["traced_on"] != "cuda:0"
    assert any("traced on cuda:0" in m for m in messages)
    assert report.verification["unet"]["max_rel"] < 1e-5
    card = (tmp_path / "model" / "README.md").read_text()
    assert '"traced_on": "cuda:0"' in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu", "model"]  # the CPU copy is gone


def test_a_device_error_inside_verification_is_one_line(released, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "gpu"
    folder.mkdir()
    traced_unet(folder / "crema_script.pt", size=128, **TINY_ORIGINAL_UNET)
    as_if_traced_on(folder / "crema_script.pt", "cuda:0")
    (folder / "audio_encoder.pt").write_bytes((released[0] / "audio_encoder.pt").read_bytes())
    monkeypatch.setattr(convert_checkpoint.ArchiveCode, "needs_rewrite", property(lambda self: False))
    assert _cli((folder,), tmp_path / "model") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: verification of the UNet failed to run (")
    assert "--no-verify" in err and not (tmp_path / "model").exists()


def test_sample_size_sets_the_frame_size(released, tmp_path, capsys):
    folder = tmp_path / "small"
    folder.mkdir()
    traced_unet(folder / "crema_script.pt", size=64, **TINY_ORIGINAL_UNET)
    (folder / "audio_encoder.pt").write_bytes((released[0] / "audio_encoder.pt").read_bytes())
    report, _ = run_convert((folder,), tmp_path / "model", sample_size=64)
    assert report.verification["unet"]["max_rel"] < 1e-5
    assert json.loads((tmp_path / "model" / "unet" / "config.json").read_text())["sample_size"] == 64
    assert _cli((folder,), tmp_path / "odd", extra=["--sample-size", "30"]) == 1
    assert capsys.readouterr().err.strip() == "error: --sample-size must be a multiple of 4 of at least 8, got 30"


def test_a_shape_error_inside_verification_is_one_line(released, tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x40 and 1280x64)\nmore detail")

    monkeypatch.setattr(DiffusedHeadsUNetModel, "forward", broken)
    assert _cli(released, tmp_path / "model") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: verification of the UNet failed to run (mat1 and mat2 shapes cannot be multiplied")
    assert len(err.splitlines()) == 1 and not (tmp_path / "model").exists()


def test_a_unet_traced_in_training_mode_is_explained_and_verified_without_dropout(released, tmp_path):
    folder = tmp_path / "train-mode"
    folder.mkdir()
    traced_unet(folder / "crema_script.pt", size=128, training=True, **TINY_ORIGINAL_UNET)
    (folder / "audio_encoder.pt").write_bytes((released[0] / "audio_encoder.pt").read_bytes())
    report, messages = run_convert((folder,), tmp_path / "model")
    assert report.source["unet"]["training_dropout_in_graph"] == 10  # one per residual block of the tiny UNet
    assert "dropout" in report.source["unet"]["meaning"]
    assert any("randomised by dropout" in m for m in messages)
    assert report.verification["unet"]["max_rel"] < 1e-5


@pytest.mark.parametrize(
    "made, mode, flag, statistics",
    [
        ("scripted", True, None, "window"),
        ("scripted", False, None, "running"),
        ("traced", True, None, "window"),
        ("traced", False, None, "running"),
        ("traced", True, False, "window"),  # traced in training mode, then .eval() before saving
        ("traced", False, True, "running"),  # traced in eval mode, then .train() before saving
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_batch_norm_mode_is_read_from_a_traces_graph_and_a_scripted_files_flag(
    released, tmp_path, made, mode, flag, statistics, verify
):
    """Whatever the file computes, the converted encoder computes: a trace's mode is in its graph (a later
    `.train()`/`.eval()` changes only the flag), a scripted file's in its flag; with or without verification."""
    from original_model import traced_audio_encoder

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "crema_script.pt").write_bytes((released[0] / "crema_script.pt").read_bytes())
    if made == "scripted":
        scripted_audio_encoder(folder / "audio_encoder.pt", training=mode, **TINY_ORIGINAL_ENCODER)
    else:
        traced_audio_encoder(folder / "audio_encoder.pt", training=mode, flag=flag, **TINY_ORIGINAL_ENCODER)
    report, messages = run_convert((folder,), tmp_path / "model", verify_models=verify)
    assert report.audio_encoder_config["batch_norm_statistics"] == statistics
    if flag is not None:
        assert any("that switch does not change what the trace computes" in m for m in messages), messages
    if verify:
        assert report.verification["audio_encoder"]["max_rel"] < 1e-5
    if statistics == "window":
        assert any(m.startswith("The audio encoder computes in training mode") for m in messages)
    # The embeddings equal the file's own, run one window per call as the original sampler runs it.
    module = torch.jit.load(str(folder / "audio_encoder.pt"))
    encoder = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True).audio_encoder
    waveform = torch.from_numpy(speech_like(0.6))
    state, original = torch.zeros(2, 1, 8), []
    with torch.no_grad():
        for window in encoder.windows(waveform[None])[0]:
            embedding, _, state = module(window.reshape(1, 1, -1), torch.LongTensor([3200]), init_state=state)
            original.append(embedding.reshape(-1))
        original = torch.stack(original)
        torch.testing.assert_close(encoder(waveform[None]).audio_embeddings[0], original, rtol=1e-4, atol=1e-5)
        # The other setting would change the embeddings a lot: the choice matters.
        other = {"window": "running", "running": "window"}[statistics]
        encoder.register_to_config(batch_norm_statistics=other)
        changed = encoder(waveform[None]).audio_embeddings[0]
    assert (changed - original).abs().max() > 0.1 * original.abs().max()
