"""A live face: speech pushed as it is spoken (a microphone, a voice agent's text to speech), frames out at 25 per
second on a real clock, each with its own 40 ms of speech.

    session = LiveSession(pipe, identity_frame)
    session.start()                       # makes frames in a thread of its own
    session.push(chunk, sampling_rate)    # as the speech comes, in chunks of any size
    session.end_turn()                    # the speech of this turn is all in
    session.clear()                       # barge-in: stop speaking now, drop what is queued
    frame = session.next_frame()          # the next frame at its time: .image, .audio, .speaking
    session.close()

The session keeps a timeline of 16 kHz samples, 640 to a frame: speech is placed on it as it arrives, and where none
has arrived the face is made from silence (idle frames: the model's own breathing and small motion). A frame can be
made once the timeline holds the 200 ms after its start (its audio window; `SpeechToFrames.lookahead_samples`), so
speech that arrives while the face is idle is placed `lead_frames` frames after the frame playing then (the
lookahead and two frames to make it in: 280 ms); idle frames already made past that point are made again from the
speech. Every frame carries its own 40 ms of the timeline, so a player that plays each frame's audio with it keeps
lips and voice together whatever the delays.
"""

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import ArgumentError
from .hub.pipeline_diffused_heads import (
    StreamingResampler,
    _FrameLoop,
    audio_context_of,
    chunk_samples,
    lookahead_samples,
    preprocess_identity_image,
)
from .media import FPS

logger = logging.getLogger(__name__)

# Frames made ahead of the one playing while the face is idle: enough to ride out a slow frame, few enough to
# be made again cheaply when speech comes.
IDLE_AHEAD_FRAMES = 2
# The most frames made ahead of the one playing (speech that arrives faster than real time waits beyond this).
MAX_AHEAD_FRAMES = 50
# Samples of the timeline kept behind the frame being made, to make frames again (rewinds reach back less).
_KEEP_SAMPLES = 16000 * 4


@dataclass
class LiveFrame:
    """One frame of a live session.

    Attributes:
        index: The frame's place on the session's timeline (frame k plays at k / 25 s after the start, plus any
            delay the session reported).
        image: `(height, width, 3)` uint8.
        audio: The frame's own 40 ms of speech, float32 at 16 kHz (silence on idle frames).
        speaking: Whether any of that audio is pushed speech (False: an idle frame).
        play_time: When it was due, on the session's clock.
        made_at: When it was made, on the session's clock.
    """

    index: int
    image: np.ndarray
    audio: np.ndarray
    speaking: bool
    play_time: float = 0.0
    made_at: float = 0.0


@dataclass
class LiveStats:
    """What a session measured: frames made, played, skipped to catch up (idle frames only), made again after a
    rewind (speech placed, barge-in), and played late."""

    made: int = 0
    played: int = 0
    skipped_idle: int = 0
    remade: int = 0
    late: int = 0
    max_late_s: float = 0.0
    frame_seconds: List[float] = field(default_factory=list)  # time to make each frame


class _Timeline:
    """16 kHz samples by their index from the session's start, with which of them are pushed speech."""

    def __init__(self):
        self.samples = torch.zeros(0)
        self.start = 0  # the index of samples[0]
        self.speech: Deque[Tuple[int, int]] = deque()  # [begin, end) ranges of speech

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    def append(self, samples: torch.Tensor, speech: bool) -> None:
        if speech and len(samples):
            if self.speech and self.speech[-1][1] == self.end:
                self.speech[-1] = (self.speech[-1][0], self.end + len(samples))
            else:
                self.speech.append((self.end, self.end + len(samples)))
        self.samples = torch.cat([self.samples, samples])

    def read(self, begin: int, end: int) -> torch.Tensor:
        return self.samples[begin - self.start : end - self.start]

    def truncate(self, at: int) -> None:
        self.samples = self.samples[: max(0, at - self.start)]
        while self.speech and self.speech[-1][0] >= at:
            self.speech.pop()
        if self.speech and self.speech[-1][1] > at:
            self.speech[-1] = (self.speech[-1][0], at)

    def is_speech(self, begin: int, end: int) -> bool:
        return any(b < end and begin < e for b, e in self.speech)

    def forget_before(self, index: int) -> None:
        if index > self.start:
            self.samples = self.samples[index - self.start :]
            self.start = index
            while self.speech and self.speech[0][1] <= index:
                self.speech.popleft()


class LiveSession:
    """A talking face driven live: see the module's text. Each session has its own sampler and state, so several
    run on one model at once.

    Args:
        pipe: A loaded `DiffusedHeadsPipeline` (shared; the session takes its own sampler).
        identity_image: The face (what the pipeline takes).
        seed: Seeds the frames' noise.
        num_inference_steps: Denoising steps per frame (default: the model's own).
        clock, sleep: The clock frames are paced on, and how to wait (tests pass a fake one).
        lead_frames: Frames between the one playing when speech arrives and the first frame of that speech
            (default: the lookahead in frames, and two to make it in).
    """

    def __init__(
        self,
        pipe,
        identity_image,
        seed: int = 0,
        num_inference_steps: Optional[int] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        lead_frames: Optional[int] = None,
    ):
        from importlib import import_module

        from . import runtime

        self.pipe = runtime.with_scheduler(pipe, own=True)
        pipe = self.pipe
        steps, timesteps = pipe.resolve_timesteps(num_inference_steps or runtime.default_steps(pipe))
        device, dtype = pipe._execution_device, pipe.unet.dtype
        size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
        identity = preprocess_identity_image(identity_image, size)[None].to(device=device, dtype=dtype)
        generator = self._generator = torch.Generator().manual_seed(seed)

        def noise(frame_index):
            return torch.randn((1, channels, size, size), generator=generator).to(device)

        self._loop = _FrameLoop(
            pipe, identity, pipe.scheduler, steps, timesteps, pipe.config.get("stabilize_every"), generator, noise
        )
        encoder_module = import_module(type(pipe.audio_encoder).__module__)
        self._encoder = encoder_module.AudioEmbeddingStream(pipe.audio_encoder, device=device)
        self.rate = pipe.audio_encoder.config.sampling_rate
        self.hop = pipe.audio_encoder.config.hop_length
        self.context = pipe.unet.config.audio_context
        self.lookahead_samples = lookahead_samples(pipe.unet, pipe.audio_encoder)
        lookahead_frames = -(-self.lookahead_samples // self.hop)
        self.lead_frames = lead_frames if lead_frames is not None else lookahead_frames + 2
        self.clock, self.sleep = clock, sleep
        self.stats = LiveStats()
        self.turn_starts: List[int] = []  # where each turn's speech begins on the timeline (16 kHz samples)

        self._timeline = _Timeline()
        self._fed = 0  # timeline samples given to the encoder
        self._encoder_states: Deque[Tuple[int, dict]] = deque([(0, self._encoder.snapshot())])
        self._embeddings: Dict[int, torch.Tensor] = {}
        self._next = 0  # the next frame to make
        # Before frame k: its motion frames and the generator's state (a rewind makes the same frames again).
        self._motion: Dict[int, tuple] = {0: self._state()}
        self._made: Dict[int, LiveFrame] = {}  # made, not yet played
        self._played = -1  # the last frame handed out (or skipped)
        self._slip = 0.0  # seconds the playing is behind the timeline's clock
        self._speaking = False  # a turn's speech is arriving (no silence is put between its chunks)
        self._commands: "queue.Queue" = queue.Queue()
        self._resampler: Optional[StreamingResampler] = None
        self._input_rate: Optional[float] = None
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._error: Optional[BaseException] = None
        self._warned_late = False
        self.t0: Optional[float] = None

    # --- what the front end calls ---

    def push(self, chunk, sampling_rate: Optional[float] = None) -> None:
        """Speech as it comes: an array or tensor of samples (1-D, or `(samples, channels)`, mixed down) at
        `sampling_rate` (16 kHz when not given); a session keeps the rate of its first chunk."""
        self._check_open()
        samples, rate = chunk_samples(chunk, sampling_rate or self.rate)
        if self._input_rate is None:
            self._input_rate, self._resampler = rate, StreamingResampler(rate, self.rate)
        elif rate != self._input_rate:
            raise ArgumentError(
                "sampling_rate",
                f"this session's speech is at {self._input_rate:g} Hz; a chunk at {rate:g} Hz cannot join it "
                "(start a new session for another rate)",
            )
        self._commands.put(("speech", self._resampler.push(samples)))
        self._wake()

    def end_turn(self) -> None:
        """The speech of this turn is all in: its last frames are made now, and the face goes back to idle."""
        self._check_open()
        tail = self._resampler.end() if self._resampler is not None else torch.zeros(0)
        if self._resampler is not None:
            self._resampler = StreamingResampler(self._input_rate, self.rate)
        self._commands.put(("end", tail))
        self._wake()

    def clear(self) -> None:
        """Barge-in: the speech not yet played is dropped, and the face stops speaking from the next frame on."""
        self._check_open()
        if self._resampler is not None:
            self._resampler = StreamingResampler(self._input_rate, self.rate)
        with self._lock:
            for index in list(self._made):
                del self._made[index]
        self._commands.put(("clear", None))
        self._wake()

    def next_frame(self, timeout: Optional[float] = None) -> LiveFrame:
        """The next frame, when it is due (25 per second from the first call). A frame that is not made by then is
        waited for and played late, its audio with it; while behind, idle frames are dropped until the session has
        caught up. Speech frames are never dropped."""
        self._check_open()
        if self.t0 is None:
            self.t0 = self.clock()
        with self._lock:
            index = self._played + 1
            while self._slip >= 1.0 / FPS and self._idle_at(index):  # catch up: drop idle frames first
                self._made.pop(index, None)
                self._played, index = index, index + 1
                self._slip -= 1.0 / FPS
                self.stats.skipped_idle += 1
            due = self.t0 + index / FPS + self._slip
        wait = due - self.clock()
        if wait > 0:
            self.sleep(wait)
        started = self.clock()
        while True:
            if self._thread is None:
                self.step()
            with self._lock:
                if self._error is not None:
                    raise self._error
                frame = self._made.pop(index, None)
                if frame is not None:
                    break
                if self._thread is not None:
                    self._lock.wait(0.005)
            if timeout is not None and self.clock() - started > timeout:
                raise TimeoutError(f"frame {index} was not made within {timeout} s")
        late = self.clock() - due
        if late > 0.5 / FPS:
            self.stats.late += 1
            self.stats.max_late_s = max(self.stats.max_late_s, late)
            self._slip += late
            if not self._warned_late:
                self._warned_late = True
                logger.warning(
                    f"the live face is {late * 1000:.0f} ms behind real time: frames take longer to make than they "
                    "play on this machine (idle frames are dropped to catch up)"
                )
        with self._lock:
            self._played = index
            self.stats.played += 1
            self._lock.notify_all()
        frame.play_time = due
        return frame

    def frames(self):
        """`next_frame` until the session is closed."""
        while not self._closed:
            yield self.next_frame()

    def start(self) -> "LiveSession":
        """Make frames in a thread of the session's own (without it, `next_frame` makes them when asked)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="live-session", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop making frames and free the session's state; a later call gets an error."""
        self._closed = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._made.clear()
        self._embeddings.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _due_of(self, index: int) -> float:
        return self.t0 + index / FPS + self._slip

    def _idle_at(self, index: int) -> bool:
        """Whether frame `index` will be an idle one (no speech is arriving, and its samples hold none)."""
        return not self._speaking and not self._timeline.is_speech(index * self.hop, (index + 1) * self.hop)

    # --- the worker ---

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this live session is closed")

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        try:
            while not self._closed:
                if not self.step():
                    with self._lock:
                        self._lock.wait(0.01)
        except BaseException as error:  # handed to the consumer, which raises it
            with self._lock:
                self._error = error
                self._lock.notify_all()

    @torch.no_grad()
    def step(self) -> bool:
        """Take the commands that came in, then make the next frame where it can be made and is wanted; whether a
        frame was made."""
        while True:
            try:
                kind, value = self._commands.get_nowait()
            except queue.Empty:
                break
            self._apply(kind, value)
        with self._lock:
            playing = self._played + 1
        if self._next < playing:  # the consumer skipped frames that were late: go on from the one playing
            if self._timeline.end < playing * self.hop:
                self._timeline.append(torch.zeros(playing * self.hop - self._timeline.end), speech=False)
            self._next = playing
            self._motion[playing] = self._state()
        if self._next - playing >= MAX_AHEAD_FRAMES:
            return False
        needed = self._next * self.hop + self.lookahead_samples
        if self._timeline.end < needed:
            if self._speaking:
                # Speech that stops arriving mid-turn: once the frame is due to be made, the gap is silence.
                due = self.t0 is not None and self.clock() >= self._due_of(self._next) - 1.0 / FPS
                if not due:
                    return False
            elif self._next - playing >= IDLE_AHEAD_FRAMES:
                return False
            self._timeline.append(torch.zeros(needed - self._timeline.end), speech=False)  # silence
        if self._timeline.end < needed:
            return False
        self._feed(needed)
        self._make_frame()
        return True

    def _apply(self, kind: str, value) -> None:
        with self._lock:
            playing = self._played + 1
        if kind == "speech":
            if not self._speaking:  # a turn starts: lead_frames after the frame playing, after any speech queued
                self._speaking = True
                start = (playing + self.lead_frames) * self.hop
                if self._timeline.speech:
                    start = max(start, self._timeline.speech[-1][1])
                if self._timeline.end > start:
                    self._rewind(start, playing)
                self._timeline.append(torch.zeros(start - self._timeline.end), speech=False)
                self.turn_starts.append(start)
            self._timeline.append(value, speech=True)
        elif kind == "end":
            if self._speaking:
                self._timeline.append(value, speech=True)
            self._speaking = False
        elif kind == "clear":
            self._speaking = False
            if self._timeline.end > playing * self.hop:
                self._rewind(playing * self.hop, playing)

    def _rewind(self, cut: int, playing: int) -> None:
        """Drop the timeline from sample `cut` on and forget what was made from it: the frames whose audio window
        reaches past the cut (those from `playing` on: the ones before have been played) are made again, and the
        encoder goes back to its last state before the cut."""
        self._timeline.truncate(cut)
        valid = max(0, (cut - self.lookahead_samples) // self.hop + 1)  # frames whose window ends before the cut
        frame_index = min(self._next, max(valid, playing))
        with self._lock:
            for index in [k for k in self._made if k >= frame_index]:
                del self._made[index]
        self.stats.remade += self._next - frame_index
        while len(self._encoder_states) > 1 and self._encoder_states[-1][0] > cut:
            self._encoder_states.pop()
        fed, state = self._encoder_states[-1]
        self._encoder.restore(state)
        self._fed = fed
        for index in [k for k in self._embeddings if k >= self._encoder.windows]:
            del self._embeddings[index]
        self._next = frame_index
        previous, generator_state = self._motion[frame_index]
        self._loop.previous = list(previous)
        self._generator.set_state(generator_state)
        for index in [k for k in self._motion if k > frame_index]:
            del self._motion[index]

    def _feed(self, end: int) -> None:
        """Give the encoder the timeline up to sample `end`, a frame's samples at a time (a state kept after each,
        for rewinds)."""
        while self._fed < end:
            stop = min(end, (self._fed // self.hop + 1) * self.hop)
            new = self._encoder.push(self._timeline.read(self._fed, stop))
            first = self._encoder.windows - len(new)
            for k in range(len(new)):
                self._embeddings[first + k] = new[k]
            self._fed = stop
            self._encoder_states.append((stop, self._encoder.snapshot()))
        horizon = self._fed - _KEEP_SAMPLES
        while len(self._encoder_states) > 1 and self._encoder_states[1][0] <= horizon:
            self._encoder_states.popleft()

    def _state(self) -> tuple:
        return list(self._loop.previous), self._generator.get_state()

    def _make_frame(self) -> None:
        index = self._next
        audio_context = audio_context_of(self._embeddings, index, self.context, self._encoder.windows - 1)
        began = time.perf_counter()
        latents = self._loop.make(index, audio_context.to(self._loop.identity_frames.dtype))
        image = ((latents[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()
        image = image.numpy()
        self.stats.frame_seconds.append(time.perf_counter() - began)
        if len(self.stats.frame_seconds) > 10000:
            del self.stats.frame_seconds[:5000]
        begin, end = index * self.hop, (index + 1) * self.hop
        audio = self._timeline.read(begin, end).numpy().copy()
        frame = LiveFrame(index, image, audio, self._timeline.is_speech(begin, end), made_at=self.clock())
        self._next = index + 1
        self._motion[self._next] = self._state()
        for k in [k for k in self._motion if k < self._next - MAX_AHEAD_FRAMES - 2]:
            del self._motion[k]
        for k in [k for k in self._embeddings if k < index - self.context]:
            del self._embeddings[k]
        self._timeline.forget_before(min(self._fed, begin) - _KEEP_SAMPLES)
        self.stats.made += 1
        with self._lock:
            if index > self._played:
                self._made[index] = frame
            self._lock.notify_all()
