import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline

from helpers import speech_like, tiny_pipeline


def frames(pipe, identity):
    pipe.set_progress_bar_config(disable=True)
    return pipe(identity, speech_like(0.2), num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames


def test_save_writes_a_self_contained_folder(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffused_heads", "DiffusedHeadsPipeline"]
    assert index["unet"] == ["unet_diffused_heads", "DiffusedHeadsUNetModel"]
    assert index["audio_encoder"] == ["audio_encoder_diffused_heads", "DiffusedHeadsAudioEncoder"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    for path in (
        "pipeline_diffused_heads.py",
        "unet/unet_diffused_heads.py",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "audio_encoder/audio_encoder_diffused_heads.py",
        "audio_encoder/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (tmp_path / path).is_file(), path


def test_round_trips_give_identical_frames(tmp_path, identity_image):
    pipe = tiny_pipeline()
    expected = frames(pipe, identity_image)
    pipe.save_pretrained(tmp_path / "a")

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert type(loaded).__name__ == "DiffusedHeadsPipeline"
    assert type(loaded.unet).__name__ == "DiffusedHeadsUNetModel"
    loaded_frames = frames(loaded, identity_image)
    # Same weights; loaded tensors sit at other memory alignments, which can change the last float bit.
    np.testing.assert_allclose(loaded_frames, expected, atol=1e-5, rtol=0)

    # load -> save -> load: the remote-code classes save module names that load again.
    loaded.save_pretrained(tmp_path / "b")
    assert (
        json.loads((tmp_path / "a" / "model_index.json").read_text())["unet"]
        == json.loads((tmp_path / "b" / "model_index.json").read_text())["unet"]
    )
    again = DiffusionPipeline.from_pretrained(tmp_path / "b", trust_remote_code=True)
    np.testing.assert_array_equal(frames(again, identity_image), loaded_frames)


def test_load_with_the_local_class(tmp_path, identity_image):
    pipe = tiny_pipeline()
    expected = frames(pipe, identity_image)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusedHeadsPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, DiffusedHeadsPipeline)
    assert type(loaded.unet) is type(pipe.unet)
    np.testing.assert_allclose(frames(loaded, identity_image), expected, atol=1e-5, rtol=0)

    swapped = DiffusedHeadsPipeline.from_pretrained(
        tmp_path, scheduler=DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    )
    assert isinstance(swapped.scheduler, DDIMScheduler)
    half = DiffusedHeadsPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16


def test_repository_root_is_a_model_folder_without_weights():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    index = json.loads(open(os.path.join(root, "model_index.json")).read())
    assert index["_class_name"] == ["pipeline_diffused_heads", "DiffusedHeadsPipeline"]
    from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder
    from diffused_heads.hub.unet.unet_diffused_heads import DiffusedHeadsUNetModel

    with torch.device("meta"):
        for cls, folder in ((DiffusedHeadsUNetModel, "unet"), (DiffusedHeadsAudioEncoder, "audio_encoder")):
            stored = cls.from_config(cls.load_config(os.path.join(root, folder)))
            assert stored.to_json_string() == cls().to_json_string(), folder


def test_every_diffusers_loading_keyword_reaches_the_components(tmp_path, identity_image):
    """The package's class loads through diffusers' own `from_pretrained`: its keywords work, and the components
    are the package's classes (no remote code is run)."""
    pipe = tiny_pipeline()
    expected = frames(pipe, identity_image)
    pipe.save_pretrained(tmp_path / "plain")
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    unet_class = type(pipe.unet)

    eager = DiffusedHeadsPipeline.from_pretrained(tmp_path / "plain", low_cpu_mem_usage=False)
    lazy = DiffusedHeadsPipeline.from_pretrained(tmp_path / "plain", low_cpu_mem_usage=True, device_map="cpu")
    for loaded in (eager, lazy):
        assert type(loaded.unet) is unet_class and not loaded.unet.device.type == "meta"
        np.testing.assert_allclose(frames(loaded, identity_image), expected, atol=1e-5, rtol=0)

    assert os.path.isfile(tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with_variant = DiffusedHeadsPipeline.from_pretrained(tmp_path / "variant", variant="fp16")
    np.testing.assert_allclose(frames(with_variant, identity_image), expected, atol=1e-5, rtol=0)

    # use_safetensors=True refuses a folder of pickles; False reads them.
    try:
        DiffusedHeadsPipeline.from_pretrained(tmp_path / "bin", use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as error:
        assert "safetensors" in str(error)
    else:
        raise AssertionError("use_safetensors=True loaded a folder without safetensors")
    from_bin = DiffusedHeadsPipeline.from_pretrained(tmp_path / "bin", use_safetensors=False)
    np.testing.assert_allclose(frames(from_bin, identity_image), expected, atol=1e-5, rtol=0)

    # Download options are accepted (they have nothing to do for a local folder).
    DiffusedHeadsPipeline.from_pretrained(tmp_path / "plain", force_download=True, local_files_only=True)


def test_from_pipe_shares_the_weights_and_changes_only_the_copy(tmp_path, identity_image):
    pipe = tiny_pipeline()
    pipe.register_to_config(stabilize_every=2, num_inference_steps=3)
    ddim = type(pipe).from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    )
    assert ddim.unet is pipe.unet and ddim.audio_encoder is pipe.audio_encoder
    assert isinstance(ddim.scheduler, DDIMScheduler) and not isinstance(pipe.scheduler, DDIMScheduler)
    assert (ddim.config.stabilize_every, ddim.config.num_inference_steps) == (2, 3)

    from diffused_heads import runtime

    unipc = runtime.with_scheduler(pipe, "unipc")
    assert type(unipc.scheduler).__name__ == "UniPCMultistepScheduler"
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and unipc.unet is pipe.unet
    assert runtime.with_scheduler(pipe, None) is pipe
    overridden = runtime.with_scheduler(pipe, None, variance_type="fixed_small")
    assert overridden.scheduler.config.variance_type == "fixed_small"
    assert pipe.scheduler.config.variance_type == "learned_range"


def test_from_pipe_keeps_each_shared_modules_dtype(identity_image):
    """A bfloat16 UNet beside a float32 audio encoder: another sampler for some calls changes neither, in the new
    pipeline or in the one it came from (diffusers' own from_pipe would cast both to float32)."""
    pipe = tiny_pipeline()
    torch.nn.Module.to(pipe.unet, torch.bfloat16)
    ddim = type(pipe).from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    )
    for each in (pipe, ddim):
        assert (each.unet.dtype, each.audio_encoder.dtype) == (torch.bfloat16, torch.float32)
    assert ddim.unet is pipe.unet
    frames(ddim, identity_image)  # and it runs
    cast = type(pipe).from_pipe(pipe, torch_dtype=torch.float32)  # asked for: diffusers' own behaviour
    assert cast.unet.dtype == torch.float32


def test_a_save_after_compiling_a_component_names_its_code_file_and_loads_back(tmp_path, identity_image):
    """`pipe.unet = torch.compile(pipe.unet)` (as `--compile` does) goes through diffusers' `__setattr__`: the
    saved folder must still name and hold the UNet's code file, and load without the package's classes."""
    pipe = tiny_pipeline()
    expected = frames(pipe, identity_image)
    pipe.unet = torch.compile(pipe.unet)
    assert pipe.config["unet"] == ("unet_diffused_heads", "DiffusedHeadsUNetModel")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["unet_diffused_heads", "DiffusedHeadsUNetModel"]
    assert (tmp_path / "unet" / "unet_diffused_heads.py").is_file()
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded.unet).__module__.startswith("diffusers_modules")
    np.testing.assert_allclose(frames(loaded, identity_image), expected, atol=1e-5, rtol=0)


def hub_cards(monkeypatch, tmp_path, cards=None):
    """The Hub as diffusers' `load_or_create_model_card` sees it: `cards` is {repo id: README text}; a repository
    without one answers as the Hub does for a missing file. Returns the repositories asked for."""
    import huggingface_hub.repocard
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append(repo_id)
        if repo_id not in (cards or {}):
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        path = os.path.join(tmp_path, repo_id.replace("/", "--") + ".md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(cards[repo_id])
        return path

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", download)
    return asked


def test_push_to_hub_writes_a_model_card_and_uploads_through_diffusers(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    asked = hub_cards(monkeypatch, tmp_path)
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id}))

    def upload(self, folder, repo_id, **kwargs):
        uploads.append((repo_id, sorted(str(p.relative_to(folder)) for p in type(tmp_path)(folder).rglob("*.*"))))

    monkeypatch.setattr(DiffusedHeadsPipeline, "_upload_folder", upload)
    tiny_pipeline().save_pretrained(tmp_path / "a", push_to_hub=True, repo_id="someone/heads")
    ((repo_id, files),) = uploads
    assert repo_id == "someone/heads"
    assert {"README.md", "pipeline_diffused_heads.py", "unet/unet_diffused_heads.py", "model_index.json"} <= set(files)
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-video"
    assert "diffused-heads" in card.data.tags and card.data.license == "other"
    assert 'from_pretrained("someone/heads", trust_remote_code=True)' in card.text
    assert asked == ["someone/heads"]  # diffusers' load_or_create_model_card asked the Hub for its card first

    # A folder with a card keeps it; a card given is written as it is.
    (tmp_path / "a" / "README.md").write_text("mine\n")
    tiny_pipeline().save_pretrained(tmp_path / "a", push_to_hub=True, repo_id="someone/heads")
    assert (tmp_path / "a" / "README.md").read_text() == "mine\n"
    tiny_pipeline().save_pretrained(tmp_path / "b", model_card="given\n")
    assert (tmp_path / "b" / "README.md").read_text() == "given\n" and len(uploads) == 2


def test_a_model_made_from_a_folder_carries_its_licence(tmp_path):
    from diffused_heads.cards import card_license, model_card

    (tmp_path / "README.md").write_text(model_card(license="cc-by-nc-sa-4.0", base_model="someone/heads"))
    assert card_license(str(tmp_path)) == "cc-by-nc-sa-4.0"
    assert card_license(str(tmp_path / "missing"), default="apache-2.0") == "apache-2.0"
    (tmp_path / "README.md").write_text("# no header\n")
    assert card_license(str(tmp_path)) == "other"


def test_push_to_hub_uploads_the_card_of_the_folder_it_was_loaded_from(tmp_path, monkeypatch):
    import huggingface_hub

    hub_cards(monkeypatch, tmp_path, {"you/carded": "---\nlicense: mit\n---\n# The Hub's own card\n"})
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id}))

    def upload(self, folder, repo_id, **kwargs):
        code = os.path.isfile(os.path.join(folder, "unet", "unet_diffused_heads.py"))
        uploads.append((repo_id, code, open(os.path.join(folder, "README.md")).read()))

    monkeypatch.setattr(DiffusedHeadsPipeline, "_upload_folder", upload)
    tiny_pipeline().save_pretrained(tmp_path / "tuned", model_card="the tuned model's card\n")
    DiffusedHeadsPipeline.from_pretrained(tmp_path / "tuned").push_to_hub("you/tuned")
    tiny_pipeline().push_to_hub("you/new")
    tiny_pipeline().push_to_hub("you/carded")
    assert uploads[0] == ("you/tuned", True, "the tuned model's card\n")
    assert uploads[1][:2] == ("you/new", True) and "library_name: diffusers" in uploads[1][2]
    # A repository's own card is kept (tagged), as diffusers' push_to_hub keeps it.
    assert uploads[2][:2] == ("you/carded", True) and "# The Hub's own card" in uploads[2][2]
    assert "license: mit" in uploads[2][2] and "- diffused-heads" in uploads[2][2]


def test_push_to_hub_into_a_subfolder_uploads_there_without_touching_the_card(tmp_path, monkeypatch):
    import huggingface_hub

    asked = hub_cards(monkeypatch, tmp_path)
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id}))

    def upload(self, folder, repo_id, **kwargs):
        uploads.append((repo_id, kwargs["subfolder"], os.path.exists(os.path.join(folder, "README.md"))))

    monkeypatch.setattr(DiffusedHeadsPipeline, "_upload_folder", upload)
    tiny_pipeline().push_to_hub("you/many", subfolder="variant-a")
    assert uploads == [("you/many", "variant-a", False)] and asked == []


def test_a_diffusers_that_no_longer_reads_the_index_through_the_hook_is_said_in_one_message(tmp_path, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path)
    plain = DiffusionPipeline._dict_from_json_file.__func__
    monkeypatch.setattr(DiffusedHeadsPipeline, "_dict_from_json_file", classmethod(plain))
    with pytest.raises(RuntimeError, match=r"no longer reads model_index.json .* trust_remote_code=True"):
        DiffusedHeadsPipeline.from_pretrained(tmp_path)


def test_a_load_in_another_thread_does_not_hide_an_unused_hook(tmp_path, monkeypatch):
    """The hook's reads are counted per `from_pretrained` call (its context), not on the class: another thread
    reading an index through the hook meanwhile does not make this call's unused hook look used."""
    import threading

    tiny_pipeline().save_pretrained(tmp_path)
    plain = DiffusionPipeline._dict_from_json_file.__func__
    hooked = DiffusedHeadsPipeline._dict_from_json_file

    def plain_while_another_thread_reads(cls, json_file, *args, **kwargs):
        other = threading.Thread(target=hooked, args=(json_file,))
        other.start()
        other.join()
        return plain(cls, json_file, *args, **kwargs)

    monkeypatch.setattr(DiffusedHeadsPipeline, "_dict_from_json_file", classmethod(plain_while_another_thread_reads))
    with pytest.raises(RuntimeError, match=r"no longer reads model_index.json"):
        DiffusedHeadsPipeline.from_pretrained(tmp_path)


def test_a_hub_models_licence_is_read_from_its_card_which_is_fetched(tmp_path, monkeypatch):
    """diffusers does not download a model's README.md, so the licence a fine-tune or a student carries on is read
    from the card fetched for it (here a stand-in of the Hub's download); without one it is "other"."""
    import huggingface_hub

    from diffused_heads import cards

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: cc-by-nc-4.0\n---\n# A model\n")
    fetched = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name: fetched.append((repo, name)) or str(card)
    )
    assert cards.model_provenance("someone/talking-heads") == ("cc-by-nc-4.0", "someone/talking-heads")
    assert fetched == [("someone/talking-heads", "README.md")]

    def offline(repo, name):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert cards.model_provenance("someone/talking-heads") == ("other", "someone/talking-heads")


@pytest.mark.parametrize("private", [True, False, None])
def test_push_to_hub_creates_the_repository_as_private_as_asked(tmp_path, monkeypatch, private):
    import huggingface_hub

    created = []

    def create_repo(repo_id, **kwargs):
        created.append((repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(DiffusedHeadsPipeline, "_upload_folder", lambda self, folder, repo_id, **kwargs: None)
    hub_cards(monkeypatch, tmp_path)
    tiny_pipeline().push_to_hub("you/heads", private=private, token="t")
    tiny_pipeline().save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="you/saved", private=private)
    assert created == [
        ("you/heads", {"exist_ok": True, "private": private, "token": "t"}),
        ("you/saved", {"exist_ok": True, "private": private, "token": None}),
    ]


def test_a_fine_tune_of_a_hub_model_names_it_as_base_model_in_its_card(tmp_path, monkeypatch):
    """`train --init-from someone/heads`: the card's header names the Hub model as `base_model` and keeps its
    licence (read from its card, here a stand-in of the Hub's download)."""

    import huggingface_hub
    from huggingface_hub import ModelCard

    from diffused_heads.cards import TrainingRun, trained_model_card

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(card))
    run = TrainingRun(
        init_from="someone/heads",
        max_steps=2,
        batch_size=2,
        learning_rate=1e-4,
        train_layers="all",
        train_audio_encoder=False,
        lip_loss_weight=0.2,
    )
    record = {"clips": 2, "minutes": 0.1, "seconds": 3.0, "device": "cpu"}
    text = trained_model_card(run, tiny_pipeline(), record)
    data = ModelCard(text).data
    assert data.base_model == "someone/heads" and data.license == "cc-by-nc-4.0"
