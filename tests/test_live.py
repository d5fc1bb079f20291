"""The live session: speech pushed as it comes, frames paced at 25 per second on a (here fake) clock, each with its
own 40 ms of speech; idle frames between turns, barge-in, falling behind and catching up, sessions side by side."""

import logging

import numpy as np
import pytest
import torch

from diffused_heads.errors import ArgumentError
from diffused_heads.live import LiveSession

from helpers import speech_like, tiny_pipeline

IDENTITY = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)


class FakeClock:
    """A clock that moves only when waited on (or when a test moves it)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += max(0.0, seconds)


def session(pipe=None, clock=None, **kwargs):
    clock = clock or FakeClock()
    pipe = pipe or tiny_pipeline()
    return LiveSession(pipe, IDENTITY, seed=3, num_inference_steps=2, clock=clock, sleep=clock.sleep, **kwargs), clock


def play(live, count):
    return [live.next_frame() for _ in range(count)]


def test_frames_come_at_25_per_second_each_with_its_own_40_ms():
    live, clock = session()
    frames = play(live, 5)
    speech = speech_like(0.6)
    live.push(speech)  # frame 5 plays next: the speech starts lead_frames (7) after it, at frame 12
    live.end_turn()
    frames += play(live, 30)
    assert [f.index for f in frames] == list(range(35))
    np.testing.assert_allclose([f.play_time - frames[0].play_time for f in frames], np.arange(35) * 0.04, atol=1e-9)
    assert live.lead_frames == 7
    speaking = [f.index for f in frames if f.speaking]
    assert speaking == list(range(12, 12 + 15))  # 0.6 s: 15 frames
    played = np.concatenate([f.audio for f in frames])
    np.testing.assert_array_equal(played[: 12 * 640], 0.0)
    np.testing.assert_allclose(played[12 * 640 : 12 * 640 + len(speech)], speech, atol=1e-7)
    np.testing.assert_array_equal(played[12 * 640 + len(speech) :], 0.0)
    assert all(f.image.shape == (16, 16, 3) and f.image.dtype == np.uint8 for f in frames)


def test_speech_from_the_start_gives_the_frames_of_the_pipeline():
    """With no lead, speech pushed before the first frame starts at frame 0: the session makes the frames that
    `pipe.stream` makes of the same speech with the same seed (up to the last three, which the stream makes from
    the end of the speech and the session from the silence after it)."""
    pipe = tiny_pipeline()
    live, _ = session(pipe, lead_frames=0)
    speech = speech_like(0.5, seed=2)
    live.push(speech)
    live.end_turn()
    made = [f.image for f in play(live, 12)]
    expected = pipe(IDENTITY, speech, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).frames[0]
    expected = (expected * 255).round()
    assert np.abs(np.stack(made)[:9].astype(float) - expected[:9]).max() <= 1


def test_a_barge_in_stops_the_speech_at_the_next_frame_and_equals_speech_cut_there():
    """Speech of 1 s from frame 7 on, cleared after frame 12 played: from frame 13 on the frames are idle, their
    audio silent, and they are the frames of a session that was given only the speech before frame 13 (what was
    made ahead is made again, from the encoder's state before the cut and with the same noise)."""
    speech = speech_like(1.0, seed=5)
    cleared, _ = session()
    cleared.push(speech)
    frames = play(cleared, 13)  # frames 0-12; the speech starts at frame 7
    for _ in range(10):
        cleared.step()  # frames made ahead, to be dropped
    cleared.clear()
    after = play(cleared, 10)
    assert [f.index for f in after] == list(range(13, 23))
    assert [f.speaking for f in frames[7:]] == [True] * 6 and not any(f.speaking for f in after)
    assert all((f.audio == 0).all() for f in after)

    cut, _ = session()
    cut.push(speech[: 6 * 640])  # the speech of frames 7 to 12
    cut.end_turn()
    reference = play(cut, 23)
    # Frames 10 to 12 were made (and played) before the clear, from windows that reached into the dropped speech.
    for a, b in zip(frames[:10] + after, reference[:10] + reference[13:]):
        np.testing.assert_array_equal(a.image, b.image)


def test_idle_frames_keep_coming_between_turns_and_move():
    live, clock = session()
    frames = play(live, 40)
    assert not any(f.speaking for f in frames) and live.stats.made == 40
    steps = [np.abs(a.image.astype(int) - b.image.astype(int)).mean() for a, b in zip(frames, frames[1:])]
    assert min(steps) > 0  # not a frozen still
    assert live.stats.made - live.stats.played <= 2  # idle frames are made only a little ahead


def test_a_second_turn_waits_for_the_speech_still_queued():
    live, _ = session()
    first, second = speech_like(0.4, seed=1), speech_like(0.2, seed=2)
    live.push(first)
    live.end_turn()
    live.push(second)
    live.end_turn()
    frames = play(live, 30)
    speaking = [f.index for f in frames if f.speaking]
    assert speaking == list(range(7, 7 + 15))  # 10 + 5 frames, one after the other
    played = np.concatenate([f.audio for f in frames])[7 * 640 :]
    np.testing.assert_allclose(played[: len(first) + len(second)], np.concatenate([first, second]), atol=1e-7)


def test_behind_real_time_idle_frames_are_skipped_and_speech_is_played_late_never_skipped(caplog):
    """Every UNet call takes 50 ms of the clock (2 steps: 100 ms a frame, 2.5 times a frame's time): idle frames are
    skipped to keep up, every speech frame is played (late, with its own audio), and the delay is said once."""
    pipe = tiny_pipeline()
    live, clock = session(pipe)
    forward = pipe.unet.forward

    def slow(*args, **kwargs):
        clock.now += 0.05
        return forward(*args, **kwargs)

    pipe.unet.forward = slow
    speech = speech_like(0.4, seed=4)
    with caplog.at_level(logging.WARNING, logger="diffused_heads"):
        idle = play(live, 10)
        live.push(speech)
        live.end_turn()
        later = play(live, 30)
    assert live.stats.skipped_idle > 0
    assert idle[-1].index > 9  # skipped ahead
    speaking = [f for f in later if f.speaking]
    assert len(speaking) == 10  # 0.4 s: every frame of it, in order
    assert [f.index for f in speaking] == list(range(speaking[0].index, speaking[0].index + 10))
    np.testing.assert_allclose(np.concatenate([f.audio for f in speaking]), speech, atol=1e-7)
    assert sum("behind real time" in r.message for r in caplog.records) == 1


def test_sessions_on_one_model_do_not_share_state():
    pipe = tiny_pipeline()
    alone, _ = session(pipe)
    alone.push(speech_like(0.3))
    alone.end_turn()
    reference = [f.image for f in play(alone, 20)]
    a, _ = session(pipe)
    b, _ = session(pipe)
    a.push(speech_like(0.3))
    a.end_turn()
    b.push(speech_like(0.5, seed=9))
    frames = []
    for _ in range(20):
        frames.append(a.next_frame().image)
        b.next_frame()
    for x, y in zip(frames, reference):
        np.testing.assert_array_equal(x, y)


def test_a_threaded_session_plays_on_a_real_clock():
    live = LiveSession(tiny_pipeline(), IDENTITY, num_inference_steps=1).start()
    try:
        live.push(speech_like(0.2))
        live.end_turn()
        frames = [live.next_frame(timeout=10) for _ in range(15)]
    finally:
        live.close()
    assert [f.index for f in frames] == list(range(15)) or live.stats.skipped_idle
    assert sum(f.speaking for f in frames) == 5
    with pytest.raises(RuntimeError, match="closed"):
        live.push(speech_like(0.1))


def test_bad_input_gets_one_clear_error():
    live, _ = session()
    live.push(speech_like(0.1), sampling_rate=16000)
    with pytest.raises(ArgumentError, match="16000 Hz"):
        live.push(speech_like(0.1, rate=8000), sampling_rate=8000)
    with pytest.raises(ValueError, match="NaN"):
        live.push(np.full(10, np.nan))
    live.close()
    with pytest.raises(RuntimeError, match="closed"):
        live.next_frame()
