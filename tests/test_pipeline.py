import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from diffused_heads.hub.pipeline_diffused_heads import DiffusedHeadsPipeline, scheduler_uses_variance

from helpers import ddpm_scheduler, speech_like, tiny_audio_encoder, tiny_pipeline, tiny_unet


class RecordingUNet(torch.nn.Module):
    """Delegates to a real UNet and records what every call received."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, sample, timestep, identity_frame, motion_frames, audio_embeddings, return_dict=True):
        self.calls.append(
            dict(
                t=int(timestep),
                identity=identity_frame.clone(),
                motion=motion_frames.clone(),
                audio=audio_embeddings.clone(),
            )
        )
        return self.inner(sample, timestep, identity_frame, motion_frames, audio_embeddings)


class ExactNoiseUNet(ModelMixin, ConfigMixin):
    """Predicts the exact noise of x_t for a fixed clean frame x0 (and a zero variance value)."""

    @register_to_config
    def __init__(
        self,
        sample_size=16,
        in_channels=3,
        out_channels=6,
        motion_frame_channels=3,
        audio_context=5,
        audio_embedding_dim=8,
        prediction_type="epsilon",
    ):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer(
            "x0",
            torch.linspace(-0.8, 0.8, in_channels * sample_size**2).reshape(1, in_channels, sample_size, sample_size),
        )
        self.register_buffer("alphas_cumprod", ddpm_scheduler().alphas_cumprod.clone())

    def forward(self, sample, timestep, identity_frame, motion_frames, audio_embeddings, return_dict=True):
        abar = self.alphas_cumprod[int(timestep)].double()
        eps = (sample.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        if self.config.prediction_type == "v_prediction":
            eps = abar.sqrt() * eps - (1 - abar).sqrt() * self.x0
        out = torch.cat([eps, torch.zeros_like(eps)], dim=1).to(sample.dtype)
        return (out,) if not return_dict else type("Out", (), {"sample": out})()


def run(pipe, identity, audio=None, **kwargs):
    audio = speech_like(0.2) if audio is None else audio
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(identity, audio, **kwargs)


def test_frames_shape_and_audio(identity_image):
    pipe = tiny_pipeline()
    out = run(pipe, identity_image, speech_like(0.3))
    assert out.frames.shape == (1, (4800 + 2560 - 3200) // 640 + 1, 16, 16, 3)
    assert out.frames.dtype == np.float32
    assert out.audio.shape == (1, 4800)


def test_output_is_the_final_sample_mapped_to_0_1_and_clipped(identity_image):
    # Euler does not clip its estimate, so an untrained UNet leaves values far outside [-1, 1].
    pipe = tiny_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    finals = []

    def keep(p, step, t, kwargs):
        if step % 3 == 2:
            finals.append(kwargs["frame_latents"].clone())
        return kwargs

    out = run(pipe, identity_image, output_type="pt", callback_on_step_end=keep)
    latents = torch.stack(finals, dim=1)
    assert latents.min() < -1.5 and latents.max() > 1.5  # so the clipping below is exercised
    torch.testing.assert_close(out.frames, ((latents + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)


def test_latents_returned_by_the_callback_replace_the_sample(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    steps = 3

    def blank_last_step(p, step, t, kwargs):
        return {"frame_latents": torch.zeros_like(kwargs["frame_latents"])} if step % steps == steps - 1 else kwargs

    out = run(pipe, identity_image, num_inference_steps=steps, callback_on_step_end=blank_last_step)
    assert np.array_equal(out.frames, np.full_like(out.frames, 0.5))
    # The replaced frame is also what the next frame is conditioned on.
    newer_motion = recorder.calls[steps]["motion"][:, 3:]
    assert torch.equal(newer_motion, torch.zeros_like(newer_motion))


def test_frame_loop_conditioning(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    finals = []
    steps = 4

    def keep_final(p, step, t, kwargs):
        if step % steps == steps - 1:
            finals.append(kwargs["frame_latents"].clone())
        return kwargs

    audio = speech_like(0.3)
    out = run(
        pipe, identity_image, audio, num_inference_steps=steps, output_type="pt", callback_on_step_end=keep_final
    )
    num_frames = out.frames.shape[1]
    assert len(recorder.calls) == num_frames * steps
    with torch.no_grad():
        embeddings = pipe.audio_encoder(torch.from_numpy(audio)[None]).audio_embeddings
    identity = recorder.calls[0]["identity"]
    expected_t = [round(k * 999 / (steps - 1)) for k in range(steps)][::-1]
    for i in range(num_frames):
        calls = recorder.calls[i * steps : (i + 1) * steps]
        assert [c["t"] for c in calls] == expected_t
        window = [min(max(j, 0), num_frames - 1) for j in range(i - 2, i + 3)]
        older = identity if i < 2 else finals[i - 2]
        newer = identity if i < 1 else finals[i - 1]
        for c in calls:
            torch.testing.assert_close(c["identity"], identity)
            torch.testing.assert_close(c["audio"], embeddings[:, window])
            torch.testing.assert_close(c["motion"], torch.cat([older, newer], dim=1))
    # The output is the last denoised sample of every frame, mapped from [-1, 1] to [0, 1].
    expected = ((torch.stack(finals, dim=1) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out.frames, expected)


def test_stabilize_every_puts_the_identity_back(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    run(pipe, identity_image, speech_like(0.4), num_inference_steps=1, stabilize_every=3)
    identity = recorder.calls[0]["identity"]
    for i, call in enumerate(recorder.calls):
        older_is_identity = torch.equal(call["motion"][:, :3], identity)
        assert older_is_identity == (i < 2 or (i > 0 and i % 3 == 0)), i


def test_grayscale_motion_frames(identity_image):
    recorder = RecordingUNet(tiny_unet(motion_frame_channels=1))
    pipe = tiny_pipeline(unet=recorder)
    run(pipe, identity_image, num_inference_steps=1)
    first = recorder.calls[0]
    assert first["motion"].shape[1] == 2
    luma = 0.2989 * first["identity"][:, 0] + 0.587 * first["identity"][:, 1] + 0.114 * first["identity"][:, 2]
    torch.testing.assert_close(first["motion"][:, 0], luma)


def test_same_seed_same_frames(identity_image):
    pipe = tiny_pipeline()
    a = run(pipe, identity_image).frames
    b = run(pipe, identity_image).frames
    c = run(pipe, identity_image, generator=torch.Generator().manual_seed(1)).frames
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


SWAPS = {
    "ddim": lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing"),
    "dpmsolver++": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
    "unipc": lambda c: UniPCMultistepScheduler.from_config(c),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
}


@pytest.mark.parametrize("name", ["ddpm", *SWAPS])
def test_scheduler_swaps_land_on_the_clean_frame(name, identity_image):
    """With an exact noise predictor every scheduler must recover the clean frame."""
    unet = ExactNoiseUNet()
    scheduler = ddpm_scheduler() if name == "ddpm" else SWAPS[name](ddpm_scheduler().config)
    pipe = DiffusedHeadsPipeline(unet=unet, audio_encoder=tiny_audio_encoder(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, identity_image, num_inference_steps=20, output_type="pt")
    expected = ((unet.x0 + 1) / 2)[0]
    assert torch.isfinite(out.frames).all()
    assert (out.frames - expected).abs().max() < 1e-3, name


@pytest.mark.parametrize("name", ["ddpm", *SWAPS])
def test_v_prediction_models_work_with_every_scheduler(name, identity_image):
    """A model trained with v-prediction (the built-in one) under each scheduler, learned variance included."""
    unet = ExactNoiseUNet(prediction_type="v_prediction")
    config = DDPMScheduler.from_config(ddpm_scheduler().config, prediction_type="v_prediction").config
    scheduler = DDPMScheduler.from_config(config) if name == "ddpm" else SWAPS[name](config)
    pipe = DiffusedHeadsPipeline(unet=unet, audio_encoder=tiny_audio_encoder(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, identity_image, num_inference_steps=20, output_type="pt")
    assert (out.frames - ((unet.x0 + 1) / 2)[0]).abs().max() < 1e-3, name
    assert scheduler_uses_variance(pipe.scheduler) == (name == "ddpm")


@pytest.mark.parametrize("name", list(SWAPS))
def test_scheduler_swaps_on_a_random_unet(name, identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    pipe.scheduler = SWAPS[name](pipe.scheduler.config)
    given = []
    real_step = type(pipe.scheduler).step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        given.append((model_output.shape[1], int(timestep), sample.dtype))
        return real_step(self, model_output, timestep, sample, *args, **kwargs)

    type(pipe.scheduler).step = step
    try:
        out = run(pipe, identity_image, num_inference_steps=5)
    finally:
        type(pipe.scheduler).step = real_step
    assert np.isfinite(out.frames).all()
    assert not scheduler_uses_variance(pipe.scheduler)  # only DDPM uses the variance channels
    # The scheduler gets the noise channels alone, at its own timesteps, which the UNet saw too, for every frame.
    frames = out.frames.shape[1]
    assert [channels for channels, _, _ in given] == [3] * len(given)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]  # Euler's are fractional; the UNet gets them whole
    assert [t for _, t, _ in given] == timesteps * frames == [c["t"] for c in recorder.calls]


def warnings_of(pipe, identity_image, **kwargs) -> str:
    import io
    import logging

    from diffusers.utils import logging as diffusers_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = diffusers_logging.get_logger(type(pipe).__module__)
    logger.addHandler(handler)
    try:
        run(pipe, identity_image, **{"num_inference_steps": 3, **kwargs})
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_ddim_with_linspace_spacing_warns(identity_image):
    """DDIM steps by num_train_timesteps // steps, which skips past "linspace" timesteps: say so and how to fix it."""
    pipe = tiny_pipeline()
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert "timestep_spacing='trailing'" in warnings_of(pipe, identity_image)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert warnings_of(pipe, identity_image) == ""
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    assert warnings_of(pipe, identity_image) == ""


def test_output_types(identity_image):
    pipe = tiny_pipeline()
    as_np = run(pipe, identity_image, output_type="np").frames
    as_pt = run(pipe, identity_image, output_type="pt").frames
    as_pil = run(pipe, identity_image, output_type="pil").frames
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (1, as_np.shape[1], 3, 16, 16)
    np.testing.assert_allclose(as_pt.permute(0, 1, 3, 4, 2).numpy(), as_np)
    assert len(as_pil) == 1 and len(as_pil[0]) == as_np.shape[1] and as_pil[0][0].size == (16, 16)
    rounded = (as_np * 255.0).round().astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(im) for im in as_pil[0]]), rounded[0])  # rounded, not truncated
    assert not np.array_equal(rounded, (as_np * 255.0).astype(np.uint8))  # (the two differ on these frames)
    frames, audio = run(pipe, identity_image, return_dict=False)
    np.testing.assert_array_equal(frames, as_np)


def test_output_type_latent_gives_the_denoised_frames_as_they_are(identity_image):
    """`output_type="latent"` (diffusers' convention): each frame as the last denoising step left it, unclipped in
    about [-1, 1] (this model's latents are the frames themselves); "pt" is the same mapped to [0, 1] and clipped."""
    pipe = tiny_pipeline()
    last_steps = []

    def keep(pipeline, step, timestep, callback_kwargs):
        if (step + 1) % pipeline.num_timesteps == 0:
            last_steps.append(callback_kwargs["frame_latents"].clone())
        return callback_kwargs

    latent = run(pipe, identity_image, output_type="latent", callback_on_step_end=keep).frames
    as_pt = run(pipe, identity_image, output_type="pt").frames
    assert isinstance(latent, torch.Tensor) and latent.dtype == torch.float32 and latent.shape == as_pt.shape
    torch.testing.assert_close(latent, torch.stack(last_steps, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(as_pt, ((latent + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)
    assert latent.min() < -0.2 and latent.max() > 0.2  # not the [0, 1] frames


def test_identity_image_kinds_agree(identity_image):
    pipe = tiny_pipeline()
    from_array = run(pipe, identity_image).frames
    from_pil = run(pipe, PIL.Image.fromarray(identity_image)).frames
    tensor = torch.from_numpy(identity_image).permute(2, 0, 1).float() / 127.5 - 1
    from_tensor = run(pipe, tensor).frames
    np.testing.assert_allclose(from_pil, from_array, atol=1e-6)
    np.testing.assert_allclose(from_tensor, from_array, atol=1e-5)
    gray = PIL.Image.fromarray(identity_image).convert("L")
    from_gray = run(pipe, gray).frames
    np.testing.assert_array_equal(from_gray, run(pipe, np.repeat(np.asarray(gray)[..., None], 3, axis=-1)).frames)
    assert np.abs(from_gray - from_array).max() > 1e-3
    rgba = PIL.Image.fromarray(identity_image).convert("RGBA")
    rgba.putalpha(128)
    np.testing.assert_array_equal(run(pipe, rgba).frames, from_pil)  # the colour channels, alpha ignored


def test_batch_and_broadcast(identity_image):
    pipe = tiny_pipeline()
    clips = [speech_like(0.2, seed=1), speech_like(0.2, seed=2)]
    out = run(pipe, identity_image, clips)
    assert out.frames.shape[0] == 2 and out.audio.shape[0] == 2
    assert np.abs(out.frames[0] - out.frames[1]).max() > 1e-4
    # One clip shared by two identities: each video equals its own single run on the same noise (DDIM: no noise
    # is added during the steps, so the initial latents are all the noise there is). Batched and single
    # convolutions differ in the last float bits, which the frame-to-frame loop of an untrained UNet amplifies
    # to ~1e-3 on average (a pixel near the clipping edge may move by 1e-2); a wrong pairing differs by ~0.1.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    identities = [identity_image, identity_image[::-1].copy()]
    num_frames = out.frames.shape[1]
    latents = torch.randn(2, num_frames, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    shared = run(pipe, identities, clips[0], latents=latents).frames
    for k in range(2):
        alone = run(pipe, identities[k], clips[0], latents=latents[k : k + 1]).frames
        assert np.abs(shared[k : k + 1] - alone).mean() < 1e-3
    assert np.abs(shared[0] - shared[1]).mean() > 0.02
    # And one identity shared by two clips.
    shared = run(pipe, identity_image, clips, latents=latents).frames
    for k in range(2):
        alone = run(pipe, identity_image, clips[k], latents=latents[k : k + 1]).frames
        assert np.abs(shared[k : k + 1] - alone).mean() < 1e-3


def test_other_sample_rates_are_resampled(identity_image):
    pipe = tiny_pipeline()
    audio_8k = speech_like(0.3, rate=8000)
    out = run(pipe, identity_image, audio_8k, sampling_rate=8000)
    assert out.audio.shape == (1, 4800)
    assert out.frames.shape[1] == (4800 + 2560 - 3200) // 640 + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(stabilize_every=-2), "stabilize_every"),
        (dict(sampling_rate=-1), "sampling_rate"),
        (dict(audio=np.zeros((2, 3200), np.float32)), "1-D"),
        (dict(audio=np.zeros(100, np.float32)), "too short"),
        (dict(audio=np.zeros(0, np.float32)), "empty"),
        (dict(audio=np.full(3200, np.nan, np.float32)), "NaN"),
        (dict(audio=[np.zeros(3200, np.float32), np.zeros(100, np.float32)]), "audio clip 1 is too short"),
        (dict(generator=[torch.Generator()] * 2), "2 generators for a batch of 1"),
        (dict(identity=np.zeros((8, 8, 2), np.uint8)), "identity image"),
        (dict(identity=torch.full((3, 8, 8), 200.0)), r"\[-1, 1\]"),
        (dict(identity="face.png"), "identity_image"),
        (dict(latents=torch.zeros(1, 1, 3, 16, 16)), "latents"),
        (dict(timesteps=[999, 199]), "num_inference_steps 3 differs from the 2 timesteps"),
        (dict(timesteps=[199, 999], num_inference_steps=2), "descending"),
        (dict(timesteps=[1000], num_inference_steps=1), "training timesteps"),
        (dict(timesteps=["a"], num_inference_steps=1), "list of integers"),
        (dict(timesteps=[999], num_inference_steps=1, ddim=True), "DDIMScheduler does not take custom timesteps"),
    ],
)
def test_bad_input_is_named(kwargs, message, identity_image):
    pipe = tiny_pipeline()
    if kwargs.pop("ddim", False):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    identity = kwargs.pop("identity", identity_image)
    audio = kwargs.pop("audio", None)
    with pytest.raises((ValueError, TypeError), match=message):
        run(pipe, identity, audio, **kwargs)


def test_model_cpu_offload_path_runs(identity_image):
    """The pipeline finds its device through accelerate's hooks (exercised on the CPU here)."""
    pipe = tiny_pipeline()
    expected = run(pipe, identity_image).frames
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(run(pipe, identity_image).frames, expected, atol=1e-6)


def test_long_audio_warning_follows_the_models_training_clip_length(identity_image, tmp_path):
    pipe = tiny_pipeline()
    assert warnings_of(pipe, identity_image) == ""  # no length stored: nothing to compare with
    pipe.register_to_config(trained_clip_seconds=0.1)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusedHeadsPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.trained_clip_seconds == 0.1
    warning = warnings_of(loaded, identity_image)  # 0.2 s of speech
    assert "the audio is 0.2 s long; this model was trained on clips up to about 0.1 s" in warning
    assert "stabilize_every" in warning
    assert warnings_of(loaded, identity_image, stabilize_every=3) == ""
    loaded.register_to_config(trained_clip_seconds=0.3)
    assert warnings_of(loaded, identity_image) == ""


def test_clips_of_different_lengths_share_a_batch_and_keep_their_lengths(identity_image):
    pipe = tiny_pipeline()
    clips = [speech_like(0.36, seed=1), speech_like(0.2, seed=2)]
    counts = [pipe.audio_encoder.num_frames(len(c)) for c in clips]
    assert counts[0] > counts[1]
    # DDPM adds noise at every step: with one generator per clip, each clip's noise is its own.
    batch = pipe(
        identity_image,
        clips,
        num_inference_steps=3,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    )
    # One type whatever the lengths: arrays of the longest, each video's own length beside them.
    assert isinstance(batch.frames, np.ndarray) and batch.frames.shape[:2] == (2, counts[0])
    assert batch.num_frames == counts and batch.num_samples == [len(c) for c in clips]
    assert batch.audio.shape == (2, len(clips[0]))
    assert not batch.frames[1, counts[1] :].any() and not batch.audio[1, len(clips[1]) :].any()
    for k, seed in enumerate((1, 2)):
        alone = pipe(identity_image, clips[k], num_inference_steps=3, generator=torch.Generator().manual_seed(seed))
        assert alone.frames.shape[1] == counts[k] and alone.num_frames == [counts[k]]
        own = batch.frames[k, : batch.num_frames[k]]
        assert np.abs(own - alone.frames[0]).mean() < 1e-3  # see test_batch_and_broadcast
        np.testing.assert_array_equal(batch.audio[k, : batch.num_samples[k]], alone.audio[0])
    images = pipe(identity_image, clips, num_inference_steps=1, output_type="pil").frames
    assert [len(video) for video in images] == counts  # lists of images: each video's own
    tensors = pipe(identity_image, clips, num_inference_steps=1, output_type="pt").frames
    assert isinstance(tensors, torch.Tensor) and tensors.shape[:2] == (2, counts[0])
    # The shorter clip's last frames see its own last audio embedding, not the padding after it.
    recorder = RecordingUNet(tiny_unet())
    recording = tiny_pipeline(unet=recorder)
    recording(identity_image, clips, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeddings = recording.audio_encoder(torch.from_numpy(clips[1])[None]).audio_embeddings[0]
    last = recorder.calls[counts[1] - 1]["audio"][1]
    torch.testing.assert_close(last[2:], embeddings[-1].expand(3, -1), rtol=1e-4, atol=1e-5)


def test_half_precision_keeps_the_precision_sensitive_parts_in_float32(identity_image):
    pipe = tiny_pipeline()
    generator = torch.Generator().manual_seed(0)
    reference = run(pipe, identity_image, num_inference_steps=5, generator=generator).frames
    pipe.unet.to(torch.bfloat16)
    dtypes = []

    def record(p, step, t, kwargs):
        dtypes.append(kwargs["frame_latents"].dtype)
        return kwargs

    half = run(
        pipe, identity_image, num_inference_steps=5, generator=generator.manual_seed(0), callback_on_step_end=record
    ).frames
    assert set(dtypes) == {torch.float32}  # the samples and the scheduler's update stay in float32
    # ... and the scheduler is given them in float32: the UNet's output and the sample.
    given = []
    real_step = DDPMScheduler.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        given.append((model_output.dtype, sample.dtype))
        return real_step(self, model_output, timestep, sample, *args, **kwargs)

    DDPMScheduler.step = step
    try:
        run(pipe, identity_image, num_inference_steps=2)
    finally:
        DDPMScheduler.step = real_step
    assert set(given) == {(torch.float32, torch.float32)}
    psnr = 10 * np.log10(1.0 / np.mean((half - reference) ** 2))
    assert psnr > 30, psnr


def test_a_compiled_unet_compiles_once_for_the_whole_clip(identity_image):
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(graph_module)
        return graph_module.forward

    pipe = tiny_pipeline()
    expected = run(pipe, identity_image, num_inference_steps=3).frames
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend=counting_backend)
    frames = run(pipe, identity_image, num_inference_steps=3).frames  # 5 frames x 3 steps
    frames_again = run(pipe, identity_image, num_inference_steps=3).frames
    assert len(compilations) == 1
    np.testing.assert_allclose(frames, expected, atol=1e-5)
    np.testing.assert_array_equal(frames_again, frames)
    torch._dynamo.reset()


def test_stabilize_every_defaults_to_the_models_own_setting(identity_image, tmp_path):
    saved = tiny_pipeline()
    saved.register_to_config(stabilize_every=1)
    saved.save_pretrained(tmp_path)
    assert DiffusedHeadsPipeline.from_pretrained(tmp_path).config.stabilize_every == 1
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    pipe.register_to_config(stabilize_every=1)
    steps = 2

    def older_motion_frames(**kwargs):
        recorder.calls.clear()
        run(pipe, identity_image, num_inference_steps=steps, **kwargs)
        return [call["motion"][:, :3] for call in recorder.calls[::steps]]

    by_default = older_motion_frames()
    identity = recorder.calls[0]["identity"]
    assert all(torch.equal(older, identity) for older in by_default)  # the identity frame at every frame
    switched_off = older_motion_frames(stabilize_every=0)
    assert all(torch.equal(older, identity) for older in switched_off[:2])  # before two frames exist
    assert not any(torch.equal(older, identity) for older in switched_off[2:])
    with pytest.raises(ValueError, match="stabilize_every must be None, 0"):
        run(pipe, identity_image, stabilize_every=-1)


# --- frames one by one, and the diffusers call conventions ---


def test_stream_yields_each_frame_as_it_is_made_and_the_call_collects_them(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    whole = run(pipe, identity_image, speech_like(0.3))
    recorder.calls.clear()
    arrivals = []
    stream = pipe.stream(
        identity_image, speech_like(0.3), num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    for output in stream:
        arrivals.append((output.frame_index, len(recorder.calls)))
        assert output.frames.shape == (1, 16, 16, 3) and output.num_frames == [whole.frames.shape[1]]
        np.testing.assert_array_equal(output.frames[0], whole.frames[0, output.frame_index])
        np.testing.assert_array_equal(output.audio[0], whole.audio[0])
    # Frame k arrives once its own 3 steps are done, before any step of frame k + 1.
    assert arrivals == [(k, 3 * (k + 1)) for k in range(whole.frames.shape[1])]
    assert pipe.num_timesteps == 3


def test_one_generator_draws_each_frames_noise_when_the_frame_is_made(identity_image):
    """Frame f's noise is the generator's next `(batch, 3, H, W)` draw when frame f is made, after the sampler's own
    noise of the frames before: with DDIM, which draws none, frame f's noise is draw f (the reference draws them
    one after another and passes them as `latents`); with DDPM, the sampler's noise of frame 0 (2 of its 3 steps
    draw) comes between draw 0 and frame 1's noise."""
    pipe = tiny_pipeline()
    clips = [speech_like(0.2, seed=1), speech_like(0.3, seed=2)]
    num_frames = (int(0.3 * 16000) + 2560 - 3200) // 640 + 1
    ddim = DiffusedHeadsPipeline.from_pipe(
        pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    )
    drawn = run(ddim, [identity_image] * 2, clips, generator=torch.Generator().manual_seed(5)).frames
    generator = torch.Generator().manual_seed(5)
    latents = torch.stack([torch.randn((2, 3, 16, 16), generator=generator) for _ in range(num_frames)], dim=1)
    given = run(ddim, [identity_image] * 2, clips, latents=latents).frames
    np.testing.assert_array_equal(drawn, given)

    drawn = run(pipe, identity_image, clips[1], generator=torch.Generator().manual_seed(5)).frames
    generator = torch.Generator().manual_seed(5)
    first = torch.randn((1, 1, 3, 16, 16), generator=generator)
    after_first = torch.Generator().set_state(generator.get_state())  # DDPM's own noise of frame 0 comes next
    latents = torch.cat([first, torch.zeros((1, num_frames - 1, 3, 16, 16))], dim=1)
    given = run(pipe, identity_image, clips[1], latents=latents, generator=after_first).frames
    np.testing.assert_array_equal(drawn[:, 0], given[:, 0])
    assert np.abs(drawn[:, 1] - given[:, 1]).max() > 1e-2


def test_a_generator_per_video_gives_each_video_as_a_lone_run_does(identity_image):
    pipe = tiny_pipeline()
    clips = [speech_like(0.2, seed=1), speech_like(0.3, seed=2)]
    together = run(pipe, [identity_image] * 2, clips, generator=[torch.Generator().manual_seed(k) for k in (3, 4)])
    for k, seed in enumerate((3, 4)):
        alone = run(pipe, identity_image, clips[k], generator=torch.Generator().manual_seed(seed)).frames[0]
        own = together.frames[k, : together.num_frames[k]]
        assert own.shape == alone.shape
        # Batched arithmetic may differ from a lone run's in the last bits only.
        np.testing.assert_allclose(own, alone, atol=1e-4)


def test_several_videos_per_identity_and_clip_each_follow_their_generator(identity_image):
    """Two identity-and-clip pairs, three samples each: video i * 3 + j is sample j of pair i, made as a lone run
    of that pair with generator i * 3 + j makes it; samples of one pair differ."""
    pipe = tiny_pipeline()
    identities = [identity_image, identity_image[::-1].copy()]
    clips = [speech_like(0.2, seed=1), speech_like(0.2, seed=2)]
    seeds = [10, 11, 12, 13, 14, 15]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = run(pipe, identities, clips, generator=generators, num_videos_per_prompt=3)
    assert out.frames.shape[0] == 6 and out.audio.shape[0] == 6
    for index, seed in enumerate(seeds):
        pair = index // 3
        alone = run(pipe, identities[pair], clips[pair], generator=torch.Generator().manual_seed(seed)).frames[0]
        # Batched convolutions differ in the last float bits, which the frame loop amplifies (see above).
        assert np.abs(out.frames[index] - alone).mean() < 1e-4 and np.abs(out.frames[index] - alone).max() < 1e-2
        np.testing.assert_array_equal(out.audio[index], out.audio[pair * 3])
    assert np.abs(out.frames[0] - out.frames[1]).mean() > 1e-3
    with pytest.raises(ValueError, match="6 videos"):  # one generator per video, not per pair
        run(pipe, identities, clips, generator=generators[:2], num_videos_per_prompt=3)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="num_videos_per_prompt must be a positive integer"):
            run(pipe, identity_image, clips[0], num_videos_per_prompt=bad)


def test_interrupt_stops_after_the_current_frame(identity_image):
    pipe = tiny_pipeline()

    def stop_in_frame_two(pipeline, step, timestep, callback_kwargs):
        if step // pipeline.num_timesteps == 1:
            pipeline._interrupt = True
        return callback_kwargs

    out = run(pipe, identity_image, speech_like(0.3), callback_on_step_end=stop_in_frame_two)
    full = run(pipe, identity_image, speech_like(0.3))
    assert out.frames.shape[1] == 2 and full.frames.shape[1] > 2
    np.testing.assert_array_equal(out.frames[0], full.frames[0, :2])
    # The next call starts afresh: the flag is cleared, whatever it was left at.
    assert run(pipe, identity_image, speech_like(0.3)).frames.shape[1] == full.frames.shape[1]


def test_callback_tensor_inputs_are_the_named_tensors(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        seen.append({name: value.clone() for name, value in callback_kwargs.items()})
        return {}

    names = ["frame_latents", "identity_frames", "motion_frames", "audio_context"]
    run(
        pipe,
        identity_image,
        num_inference_steps=2,
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=names,
    )
    assert all(set(kwargs) == set(names) for kwargs in seen)
    first_call = recorder.calls[0]
    torch.testing.assert_close(seen[0]["identity_frames"], first_call["identity"])
    torch.testing.assert_close(seen[0]["motion_frames"], first_call["motion"])
    torch.testing.assert_close(seen[0]["audio_context"], first_call["audio"])
    assert seen[0]["frame_latents"].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, identity_image, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])


def test_the_model_config_gives_the_default_steps(identity_image):
    recorder = RecordingUNet(tiny_unet())
    pipe = tiny_pipeline(unet=recorder)
    pipe.register_to_config(num_inference_steps=4)
    run(pipe, identity_image, speech_like(0.05), num_inference_steps=None)
    assert len(recorder.calls) == 4 * 1


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler])
def test_every_frame_starts_from_noise_at_the_schedulers_initial_scale(identity_image, scheduler_class):
    """A frame's first sample is its noise times the scheduler's `init_noise_sigma` (1 for DDPM and DDIM, the
    largest sigma for Euler): the value the first `scale_model_input` receives, given noise and drawn noise."""
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first_samples = []
    scale_model_input = pipe.scheduler.scale_model_input

    def record(sample, timestep, *args, **kwargs):
        if timestep == pipe.scheduler.timesteps[0]:
            first_samples.append(sample.clone())
        return scale_model_input(sample, timestep, *args, **kwargs)

    pipe.scheduler.scale_model_input = record
    num_frames = 5  # of 0.2 s of speech
    latents = torch.randn(1, num_frames, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    run(pipe, identity_image, speech_like(0.2), latents=latents)
    pipe.scheduler.set_timesteps(3)
    sigma = float(pipe.scheduler.init_noise_sigma)
    assert (sigma > 5.0) == (scheduler_class is EulerDiscreteScheduler)
    assert len(first_samples) == num_frames
    for frame_index, sample in enumerate(first_samples):
        torch.testing.assert_close(sample, latents[:, frame_index] * sigma)

    first_samples.clear()
    run(pipe, identity_image, speech_like(0.2))  # noise drawn from the generator
    drawn = torch.cat(first_samples)
    assert abs(float(drawn.std()) / sigma - 1.0) < 0.1


def test_the_model_hooks_are_freed_when_a_consumer_stops_early(identity_image):
    """`stream` frees the offload hooks when its loop ends, and also when the consumer stops after a frame and
    closes the generator (as `generate-batch` does once all its clips are written)."""
    pipe = tiny_pipeline()
    freed = []
    pipe.maybe_free_model_hooks = lambda: freed.append(True)
    frames = pipe.stream(identity_image, speech_like(0.3), num_inference_steps=1)
    next(frames)
    assert freed == []
    frames.close()
    assert freed == [True]
    list(pipe.stream(identity_image, speech_like(0.2), num_inference_steps=1))
    assert freed == [True, True]
