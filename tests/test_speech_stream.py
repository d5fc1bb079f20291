"""Speech that arrives as it is spoken: `pipe.stream` over chunks makes the frames of the whole-speech call, each
as soon as the speech its audio window needs is in, with the encoder's state carried from chunk to chunk."""

import asyncio

import numpy as np
import pytest
import torch

from diffused_heads import builtin_model_path, example_image_path
from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import AudioEmbeddingStream
from diffused_heads.hub.pipeline_diffused_heads import (
    DiffusedHeadsPipeline,
    StreamingResampler,
    lookahead_samples,
    resample_audio,
)
from diffused_heads.media import load_identity_frame

from helpers import speech_like, tiny_audio_encoder, tiny_pipeline

IDENTITY = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)


def chunks_of(waveform, size):
    for start in range(0, len(waveform), size):
        yield waveform[start : start + size]


def at_rate(seconds, rate, seed=0):
    """Speech-like audio made at `rate` itself (not resampled from 16 kHz)."""
    return speech_like(seconds, rate=rate, seed=seed)


def whole_and_streamed(pipe, identity, waveform, rate, chunk, seed=0, **kwargs):
    whole = pipe(identity, waveform, sampling_rate=rate, generator=torch.Generator().manual_seed(seed), **kwargs)
    streamed = [
        output.frames[0]
        for output in pipe.stream(
            identity,
            chunks_of(waveform, chunk),
            sampling_rate=rate,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
    ]
    return whole.frames[0], np.stack(streamed)


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("chunk_seconds", [None, 0.02, 0.137, 2.0])  # None: one sample at a time
def test_streamed_speech_gives_the_frames_of_the_whole_speech(rate, chunk_seconds):
    pipe = tiny_pipeline()
    seconds = 0.5 if chunk_seconds else 0.3
    waveform = at_rate(seconds, rate)
    chunk = max(1, round(chunk_seconds * rate)) if chunk_seconds else 1
    whole, streamed = whole_and_streamed(pipe, IDENTITY, waveform, rate, chunk, num_inference_steps=3)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=1 / 255)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["builtin-fast", "builtin-ddpm"])
def test_the_built_in_models_stream_the_frames_of_the_whole_speech(name):
    pipe = DiffusedHeadsPipeline.from_pretrained(builtin_model_path(name))
    pipe.set_progress_bar_config(disable=True)
    identity = load_identity_frame(example_image_path())
    waveform = at_rate(0.4, 44100, seed=3)
    whole, streamed = whole_and_streamed(pipe, identity, waveform, 44100, round(0.137 * 44100))
    assert streamed.shape == whole.shape == (10, 48, 48, 3)
    np.testing.assert_allclose(streamed, whole, atol=1 / 255)


def test_the_encoder_state_is_carried_between_chunks():
    """The stream's embeddings are the whole clip's; the GRU's state started afresh at a chunk would change every
    embedding after it."""
    encoder = tiny_audio_encoder()
    waveform = torch.from_numpy(speech_like(1.0, seed=4))
    with torch.no_grad():
        whole = encoder(waveform).audio_embeddings[0]
        stream = AudioEmbeddingStream(encoder)
        parts = [stream.push(part) for part in waveform.split(777)] + [stream.end()]
    streamed = torch.cat(parts)
    assert streamed.shape == whole.shape == (25, 8) and stream.num_frames == 25
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)


def test_window_k_is_encoded_once_its_last_sample_is_in():
    """Window k spans the samples 640 k - 1280 to 640 k + 1920 (0.2 s around frame k, the first padded with
    zeros): it is encoded after sample 640 k + 1919 arrives, not before."""
    stream = AudioEmbeddingStream(tiny_audio_encoder())
    counts = []
    with torch.no_grad():
        for _ in range(3200):
            stream.push(torch.zeros(1))
            counts.append(stream.windows)
    received = np.arange(1, 3201)
    np.testing.assert_array_equal(counts, np.maximum(0, (received - 1920) // 640 + 1))


def test_the_lookahead_is_200_ms_for_the_released_configuration():
    """The released encoder's window reaches 1,920 samples (120 ms) past its frame's start; the UNet's 5-frame
    context reaches two frames (80 ms) further."""
    from diffused_heads.hub.audio_encoder.audio_encoder_diffused_heads import DiffusedHeadsAudioEncoder

    released_encoder = DiffusedHeadsAudioEncoder()  # the released configuration (window 3,200, hop 640)
    assert lookahead_samples(tiny_pipeline().unet, released_encoder) == 3200  # 200 ms at 16 kHz


def test_each_frame_comes_as_soon_as_its_speech_is_in_and_not_before():
    pipe = tiny_pipeline()
    waveform = speech_like(0.6)
    taken = []

    def counted_chunks():
        for chunk in chunks_of(waveform, 320):  # 20 ms
            taken.append(len(chunk))
            yield chunk

    seen = [
        (output.frame_index, sum(taken)) for output in pipe.stream(IDENTITY, counted_chunks(), num_inference_steps=2)
    ]
    total = pipe.audio_encoder.num_frames(len(waveform))
    assert [index for index, _ in seen] == list(range(total))
    for index, received in seen:
        needed = 640 * index + 3200
        if needed <= len(waveform):
            # Made once its speech is in, and before the next 20 ms chunk is read.
            assert needed <= received < needed + 320, (index, received)
        else:
            assert received == len(waveform)  # the last frames, at the end of the stream


def test_each_frame_carries_its_own_40_ms_of_speech():
    pipe = tiny_pipeline()
    waveform = speech_like(0.3)
    for streamed in (False, True):
        audio = chunks_of(waveform, 500) if streamed else waveform
        outputs = list(pipe.stream(IDENTITY, audio, num_inference_steps=1))
        assert len(outputs) == 7
        own = np.concatenate([output.frame_audio[0] for output in outputs])
        np.testing.assert_allclose(own, waveform[: 7 * 640], atol=1e-6)


def test_stereo_chunks_are_mixed_and_chunks_may_carry_their_rate():
    pipe = tiny_pipeline()
    waveform = at_rate(0.3, 22050)
    mono = [
        o.frames[0]
        for o in pipe.stream(
            IDENTITY,
            chunks_of(waveform, 999),
            sampling_rate=22050,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(1),
        )
    ]
    left, right = waveform * 1.5, waveform * 0.5  # their mean is the mono signal
    stereo = np.stack([left, right], axis=1)
    tagged = ((stereo[k : k + 999], 22050) for k in range(0, len(stereo), 999))
    mixed = [
        o.frames[0]
        for o in pipe.stream(IDENTITY, tagged, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    ]
    np.testing.assert_allclose(np.stack(mixed), np.stack(mono), atol=1e-5)


def test_an_async_stream_gives_the_frames_of_a_sync_one():
    pipe = tiny_pipeline()
    waveform = speech_like(0.4)

    async def arriving():
        for chunk in chunks_of(waveform, 640):
            await asyncio.sleep(0)
            yield chunk

    async def collect():
        return [
            o.frames[0]
            async for o in pipe.astream(
                IDENTITY, arriving(), num_inference_steps=2, generator=torch.Generator().manual_seed(2)
            )
        ]

    frames = asyncio.run(collect())
    whole = pipe(IDENTITY, waveform, num_inference_steps=2, generator=torch.Generator().manual_seed(2)).frames[0]
    np.testing.assert_allclose(np.stack(frames), whole, atol=1 / 255)
    with pytest.raises(TypeError, match="astream"):
        next(pipe.stream(IDENTITY, arriving()))


def test_resampling_as_it_arrives_equals_resampling_the_whole():
    waveform = torch.from_numpy(at_rate(0.7, 44100))
    whole = resample_audio(waveform, 44100, 16000)
    resampler = StreamingResampler(44100, 16000)
    parts = [resampler.push(part) for part in waveform.split(1001)] + [resampler.end()]
    torch.testing.assert_close(torch.cat(parts), whole, atol=0, rtol=0)


def test_bad_streams_get_one_clear_error():
    pipe = tiny_pipeline()
    waveform = speech_like(0.3)
    changing = iter([(waveform[:3000], 16000), (waveform[3000:], 8000)])
    with pytest.raises(ValueError, match="sampling rate changed from 16000 to 8000"):
        list(pipe.stream(IDENTITY, changing, num_inference_steps=1))
    with pytest.raises(ValueError, match="NaN"):
        list(pipe.stream(IDENTITY, iter([np.full(100, np.nan, dtype=np.float32)]), num_inference_steps=1))
    with pytest.raises(ValueError, match="too short"):
        list(pipe.stream(IDENTITY, iter([waveform[:300]]), num_inference_steps=1))
    with pytest.raises(ValueError, match="one identity image"):
        list(pipe.stream([IDENTITY, IDENTITY], iter([waveform]), num_inference_steps=1))

    def broken():
        yield waveform[:5000]
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError):
        list(pipe.stream(IDENTITY, broken(), num_inference_steps=1))


def test_silence_only_gives_frames():
    pipe = tiny_pipeline()
    outputs = list(pipe.stream(IDENTITY, chunks_of(np.zeros(8000, dtype=np.int16), 320), num_inference_steps=1))
    assert len(outputs) == 12 and outputs[-1].num_frames == [12] and outputs[0].num_frames is None
    assert all(np.isfinite(o.frames).all() for o in outputs)
