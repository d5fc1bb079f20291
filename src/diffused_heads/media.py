"""Reading identity frames and speech from media files, and writing talking-head videos.

No system ffmpeg and no torchaudio: images go through Pillow, audio through soundfile (WAV, FLAC, OGG,
MP3) or PyAV (AAC/M4A and the audio track of MP4, MOV, MKV, WebM), videos through PyAV, which bundles
FFmpeg's libraries.
"""

import contextlib
import logging
import os
import random
import tempfile
import warnings
from fractions import Fraction
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .errors import ArgumentError, MediaError
from .hub.pipeline_diffused_heads import resample_audio

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
FPS = 25
VIDEO_SIZE = 256  # the videos' frame size by default: the original's x2 enlargement of its 128-px frames
SAMPLES_PER_FRAME = SAMPLING_RATE // FPS
# The background of the CREMA-D crops the model was trained on; transparent pixels are filled with it.
GREEN_BACKGROUND = (0, 177, 64)
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}

__all__ = ["MediaError", "load_identity_frame", "load_audio", "export_to_video_with_audio", "save_frames"]


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise MediaError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise MediaError(f"{what} is not a file: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{what} is empty: {path}")


# --------------------------------------------------------------------------------------------------
# Identity frame


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB, upright (EXIF orientation), transparency filled with the training green."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit (and 32-bit) grey: scale to 8 bits rather than clip at 255.
        array = np.asarray(image.convert("F") if image.mode != "F" else image, np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return PIL.Image.fromarray((array / top * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, GREEN_BACKGROUND + (255,))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def square(image: PIL.Image.Image, resize: str = "crop") -> PIL.Image.Image:
    """A non-square image centre-cropped to a square (`resize="crop"`), or left whole (`"stretch"`)."""
    if resize not in ("crop", "stretch"):
        raise ArgumentError("resize", f"must be 'crop' or 'stretch', got {resize!r}")
    width, height = image.size
    if width == height or resize == "stretch":
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    logger.info(
        f"the {width}x{height} identity image was centre-cropped to {side}x{side} (resize 'stretch' keeps all)"
    )
    return image.crop((left, top, left + side, top + side))


# Larger images are refused before they are decoded (a small file can hold a huge picture).
MAX_PIXELS = 100_000_000


def _decode_image(path: str, max_pixels: int):
    """`(RGB image, None)`, or `(None, why)` when the file is no image; `MediaError` for one with too many pixels,
    which is found from the header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # the limit is checked here
            with PIL.Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise MediaError(
                        f"{path} has {width}x{height} pixels, more than the {max_pixels / 1e6:g} million read here"
                    )
                opened.load()
                return to_rgb(opened), None
    except PIL.Image.DecompressionBombError as error:
        raise MediaError(f"{path} has more than the {max_pixels / 1e6:g} million pixels read here ({error})") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, MediaError):
            raise
        return None, str(error)


def picture_size(path: str) -> Optional[Tuple[int, int]]:
    """The width and height of an image, or of a video's frames, from the file's header (nothing is decoded);
    None for a file that is neither."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as opened:
                return opened.size
    except PIL.Image.DecompressionBombError:
        with open(path, "rb") as f:  # the header again, past Pillow's own limit
            return _png_or_none_size(f.read(32))
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    try:
        with _video_stream(path) as (_, stream):
            return stream.codec_context.width, stream.codec_context.height
    except MediaError:
        return None


def _png_or_none_size(header: bytes) -> Optional[Tuple[int, int]]:
    if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR":
        return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    return (1 << 15, 1 << 15)  # too large for Pillow's own limit, whatever its exact size


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """An image file as 8-bit RGB, upright, whatever its mode (see `to_rgb`); `MediaError` if it is none, or if it
    has more than `max_pixels` pixels."""
    _check_file(path, "image")
    image, why = _decode_image(path, max_pixels)
    if image is None:
        raise MediaError(f"{path} is not an image that can be read ({why})")
    return image


# --------------------------------------------------------------------------------------------------
# Video: the one reader


@contextlib.contextmanager
def _video_stream(path: str):
    """The opened container and its first video stream; `MediaError` for a file that is no readable video."""
    import av

    _check_file(path, "video")
    try:
        with open(path, "rb") as f, av.open(f) as container:  # a file object: any file name
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            yield container, container.streams.video[0]
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as a video: {error}") from None


def iter_video_frames(path: str, start: int = 0, count: Optional[int] = None) -> Iterator[np.ndarray]:
    """The frames of a video from frame `start` on (at most `count` of them), as `(height, width, 3)` uint8 RGB,
    decoded one at a time."""
    import av

    with _video_stream(path) as (container, stream):
        try:
            index = 0
            for decoded in container.decode(stream):
                if count is not None and index >= start + count:
                    break
                if index >= start:
                    yield decoded.to_ndarray(format="rgb24")
                index += 1
        except av.FFmpegError as error:
            raise MediaError(f"{path} could not be read as a video: {error}") from None


def iter_video_frames_at(path: str, fps: float = FPS) -> Iterator[Tuple[float, np.ndarray]]:
    """The frames of a video resampled to `fps` frames per second by their time stamps, decoded one at a time:
    output frame k is the source frame on screen at time k / fps (frames are repeated or skipped), given with
    the time (seconds from the first frame) at which the source shows it."""
    import av

    with _video_stream(path) as (container, stream):
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        previous, previous_time, start, output = None, 0.0, None, 0
        try:
            for position, decoded in enumerate(container.decode(stream)):
                time = decoded.time if decoded.time is not None else position / rate
                start = time if start is None else start
                time -= start
                if previous is not None:
                    while output / fps < time:  # the previous frame is on screen until this one
                        yield previous_time, previous
                        output += 1
                previous, previous_time = decoded.to_ndarray(format="rgb24"), time
        except av.FFmpegError as error:
            raise MediaError(f"{path} could not be read as a video: {error}") from None
        if previous is not None:
            end = previous_time + 1.0 / rate
            while output / fps < end - 1e-6:
                yield previous_time, previous
                output += 1


def video_frame_count(path: str, decode: bool = True) -> Optional[int]:
    """How many frames a video has: from its header, else (with `decode`) by decoding it, else None."""
    with _video_stream(path) as (container, stream):
        if stream.frames:
            return stream.frames
        if not decode:
            if stream.duration and stream.average_rate:
                return round(float(stream.duration * stream.time_base * stream.average_rate))
            return None
    return sum(1 for _ in iter_video_frames(path))


def read_video_frames(path: str, start: int = 0, count: Optional[int] = 1) -> List[PIL.Image.Image]:
    """Up to `count` frames (None: all) of a video from frame `start` on, as RGB images; at least that one, or
    `MediaError`."""
    frames = [PIL.Image.fromarray(frame) for frame in iter_video_frames(path, start, count)]
    if not frames:
        raise MediaError(f"{path} has no frame {start}" + (f" (it has {video_frame_count(path)})" if start else ""))
    return frames


def read_video(path: str, size: Optional[int] = None) -> np.ndarray:
    """All frames of a video as `(num_frames, size, size, 3)` uint8, centre-cropped to a square and resized with
    an antialiasing bilinear filter (`size=None`: as they are); `MediaError` for a video with no frames."""
    frames = list(iter_video_frames(path))
    if not frames:
        raise MediaError(f"{path} holds no video frames")
    array = np.stack(frames)
    if size is None:
        return array
    height, width = array.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize_frames(array[:, top : top + side, left : left + side], size)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Square `(N, S, S, 3)` uint8 frames at `size` x `size`, with an antialiasing bilinear filter (as they are
    when they have that size already)."""
    import torch.nn.functional as F

    if frames.shape[1] == size and frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def random_frame_index(path: str, seed: Optional[int]) -> int:
    """The frame `random_frame=True` takes from a video: drawn with `seed` among all its frames."""
    total = video_frame_count(path)
    if not total:
        raise MediaError(f"{path} has no video frames")
    return random.Random(seed).randrange(total)


# --------------------------------------------------------------------------------------------------
# Identity frame, continued


def load_identity_frame(
    path: str,
    frame: Optional[int] = None,
    random_frame: bool = False,
    resize: str = "crop",
    seed: Optional[int] = None,
    max_pixels: int = MAX_PIXELS,
) -> PIL.Image.Image:
    """The identity frame from an image (PNG, JPEG, WebP, BMP, ...) or a video file, as a square RGB image.

    Args:
        path: The image or video file.
        frame: For a video, the index of the frame to take (default: the first).
        random_frame: For a video, take a random frame (reproducible with `seed`).
        resize: `"crop"` centre-crops a non-square image to a square; `"stretch"` keeps it whole (the
            pipeline then stretches it, as the original code did).
        max_pixels: Images with more pixels are refused (`MediaError`) before they are decoded.
    """
    _check_file(path, "identity image")
    if frame is not None and frame < 0:
        raise ArgumentError("frame", f"must be >= 0, got {frame}")

    def video_frame() -> PIL.Image.Image:
        return read_video_frames(path, random_frame_index(path, seed) if random_frame else frame or 0)[0]

    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        image = video_frame()
    else:
        image, why = _decode_image(path, max_pixels)
        if image is None:
            try:
                image = video_frame()
            except MediaError:
                raise MediaError(f"{path} is not an image or video that can be read ({why})") from None
        else:
            if frame is not None or random_frame:
                raise ArgumentError("frame", f"applies to videos only, and {path} is an image")
    if min(image.size) < 8:
        raise MediaError(f"the identity image {path} is too small ({image.size[0]}x{image.size[1]})")
    return square(image, resize)


# --------------------------------------------------------------------------------------------------
# Audio


def _read_with_soundfile(path: str):
    import soundfile

    try:
        with open(path, "rb") as f:  # a file object: libsndfile takes names in UTF-8 only
            data, rate = soundfile.read(f, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None
    return data.mean(axis=1), rate


def _read_with_av(path: str):
    import av

    try:
        with open(path, "rb") as f, av.open(f) as container:  # a file object: any file name
            if not container.streams.audio:
                raise MediaError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=stream.rate)
            chunks = []
            for packet_frame in container.decode(stream):
                for converted in resampler.resample(packet_frame):
                    chunks.append(converted.to_ndarray()[0])
            for converted in resampler.resample(None):
                chunks.append(converted.to_ndarray()[0])
            rate = stream.rate
            # The track's length from the header: decoding AAC also returns the padding of its last packet.
            length = round(float(stream.duration * stream.time_base) * rate) if stream.duration else None
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as audio: {error}") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return (samples[:length] if length else samples), rate


def audio_duration(path: str) -> Optional[float]:
    """The length in seconds of an audio or video file's sound, from its header (no decoding); None when the file
    cannot tell it (or cannot be read: `load_audio` then says why)."""
    import soundfile

    try:
        info = soundfile.info(path)
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError, OSError):
        pass
    import av

    try:
        with open(path, "rb") as f, av.open(f) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / 1_000_000
    except (av.FFmpegError, OSError):
        pass
    return None


def load_audio(
    path: str,
    start: float = 0.0,
    duration: Optional[float] = None,
    sampling_rate: int = SAMPLING_RATE,
) -> np.ndarray:
    """Speech from any common audio or video file as mono float32 at `sampling_rate` (16 kHz by default).

    Channels are averaged; other sample rates are converted with a band-limited resampler. `start` and
    `duration` (seconds) select a part. Silence is allowed but reported as a warning. (How long a clip the model
    handles well is the model's business: the pipeline warns about audio longer than its `trained_clip_seconds`.)
    """
    _check_file(path, "audio file")
    if start < 0 or (duration is not None and duration <= 0):
        raise ArgumentError("start", f"must be >= 0 and duration > 0, got start={start}, duration={duration}")
    decoded = _read_with_soundfile(path)
    if decoded is None:
        decoded = _read_with_av(path)
    samples, rate = decoded
    if samples.size == 0:
        raise MediaError(f"{path} holds no audio samples")
    first = int(round(start * rate))
    if first >= len(samples):
        raise ArgumentError("start", f"{start:g} s is beyond the end of {path} ({len(samples) / rate:.2f} s)")
    last = len(samples) if duration is None else min(len(samples), first + int(round(duration * rate)))
    samples = samples[first:last]
    if not np.isfinite(samples).all():
        raise MediaError(f"{path} holds NaN or infinite samples")
    waveform = resample_audio(torch.from_numpy(np.ascontiguousarray(samples, np.float32)), rate, sampling_rate)
    waveform = waveform.numpy().astype(np.float32, copy=False)
    seconds = len(waveform) / sampling_rate
    if len(waveform) < SAMPLES_PER_FRAME * sampling_rate // SAMPLING_RATE:
        raise MediaError(f"{path} is too short ({seconds * 1000:.0f} ms); one video frame needs 40 ms of audio")
    if np.abs(waveform).max() < 1e-4:
        if first > 0 or last < len(samples):
            part = f"the part of {path} from {first / rate:g}s to {last / rate:g}s"
        else:
            part = path
        logger.warning(f"{part} is silent; the face will not speak")
    return waveform


# --------------------------------------------------------------------------------------------------
# Video


FramesInput = Union[np.ndarray, torch.Tensor, Sequence[PIL.Image.Image]]


def _to_uint8_image(frame, size: Optional[int]) -> np.ndarray:
    """One frame (HxWx3 float in [0, 1] or uint8, 3xHxW tensor, or PIL image) as HxWx3 uint8, scaled to `size`."""
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
        if frame.ndim == 3 and frame.shape[0] in (1, 3) and frame.shape[-1] not in (1, 3):
            frame = frame.transpose(1, 2, 0)
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"a frame must be (height, width, 3), got shape {frame.shape}")
        if frame.dtype != np.uint8:
            frame = (np.clip(frame, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        image = PIL.Image.fromarray(frame)
    elif isinstance(frame, PIL.Image.Image):
        image = frame.convert("RGB")
    else:
        raise TypeError(f"a frame must be an array, a tensor or a PIL image, got {type(frame).__name__}")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(image)


def _check_output(path: str, overwrite: bool) -> str:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (overwrite=True replaces it)")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the folder for {path} does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot write in {directory}")
    return directory


def default_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask (temporary files are made 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _written_in_place_of(path: str, suffix: str):
    """Yield a temporary file name beside `path`; once the block succeeds it becomes `path` (with the mode a plain
    `open()` gives), and if it fails it is removed, so no half-written file is ever left."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=".partial-", dir=directory)
    except OSError as error:  # name the file asked for, not the temporary one
        raise type(error)(error.errno, error.strerror, path) from None
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class VideoWriter:
    """Writes a talking-head MP4 (H.264 yuv420p + AAC, as browsers play it) frame by frame, as frames are made, with
    the audio that belongs to each frame muxed beside it, so memory does not grow with the length of the video.

        with VideoWriter("out.mp4", audio=waveform) as writer:
            for frame in frames:
                writer.write(frame)

    Frame `i` gets the samples `round(i * sampling_rate / fps)` up to the next frame's (zeros past the audio's
    end), so audio and video end together. By default the file is written under a temporary name beside `path`
    and renamed when complete; if the block fails (or is interrupted) the temporary file is removed and an
    existing `path` is kept. With `live=True` the file is a fragmented MP4 written at `path` itself, which a
    player can open while it grows; if the block fails the frames written so far are closed into a playable
    file (`frames_written` says how many).
    """

    def __init__(
        self,
        path: str,
        audio: Optional[np.ndarray] = None,
        fps: int = FPS,
        sampling_rate: int = SAMPLING_RATE,
        size: Optional[int] = VIDEO_SIZE,
        overwrite: bool = False,
        live: bool = False,
        audio_per_frame: bool = False,
        low_latency: bool = False,
    ):
        _check_output(path, overwrite)
        self.path, self.fps, self.sampling_rate, self.size, self.live = path, fps, sampling_rate, size, live
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        self.audio_per_frame = audio_per_frame  # each frame's audio comes with it (`write(frame, audio)`)
        self.low_latency = low_latency
        self.frames_written = 0
        self._container = self._video = self._audio_stream = None
        self._target = None

    # --- the file ---

    def __enter__(self) -> "VideoWriter":
        self.open()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        import av

        if self.live:
            self._target = self.path
            # Each fragment goes to the file as soon as it is complete (without flush_packets the muxer's output
            # stays buffered until the end, and a player finds nothing to play meanwhile).
            options = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
        else:
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                handle, self._target = tempfile.mkstemp(suffix=".mp4", prefix=".partial-", dir=directory)
            except OSError as error:  # name the file asked for, not the temporary one
                raise type(error)(error.errno, error.strerror, self.path) from None
            os.close(handle)
            options = {}
        try:
            self._container = av.open(self._target, mode="w", format="mp4", options=options)
        except BaseException:
            self._remove_target()
            raise

    def _start_streams(self, width: int, height: int) -> None:
        import av  # noqa: F401  (the container is open)

        if width % 2 or height % 2:
            raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {width}x{height}")
        self._video = self._container.add_stream("libx264", rate=Fraction(self.fps))
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        # A live file gets a keyframe (so a fragment) every second, so a player can follow it; for speech that is
        # still arriving (`low_latency`) no frame is held back in the encoder's lookahead either.
        live = {"g": str(self.fps), **({"tune": "zerolatency"} if self.low_latency else {})} if self.live else {}
        self._video.options = {"crf": "18", "preset": "medium", **live}
        if self.audio is not None or self.audio_per_frame:
            self._audio_stream = self._container.add_stream("aac", rate=self.sampling_rate)
            self._audio_stream.layout = "mono"

    def write(self, frame, audio: Optional[np.ndarray] = None) -> None:
        """Encode one frame (HxWx3 float in [0, 1] or uint8, a 3xHxW tensor, or a PIL image) and its audio: the
        writer's audio at the frame's time, or (`audio_per_frame`) the `audio` given with it, `sampling_rate /
        fps` samples (cut or padded with silence to that)."""
        import av

        if self._container is None:
            self.open()
        image = _to_uint8_image(frame, self.size)
        if self._video is None:
            self._start_streams(image.shape[1], image.shape[0])
        elif (image.shape[1], image.shape[0]) != (self._video.width, self._video.height):
            raise ValueError(
                f"every frame must have the first one's size {self._video.width}x{self._video.height}, "
                f"got {image.shape[1]}x{image.shape[0]}"
            )
        for packet in self._video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            self._container.mux(packet)
        if self._audio_stream is not None:
            self._write_audio(self.frames_written, audio)
        self.frames_written += 1

    def _write_audio(self, index: int, audio: Optional[np.ndarray] = None) -> None:
        import av

        first = round(index * self.sampling_rate / self.fps)
        last = round((index + 1) * self.sampling_rate / self.fps)
        samples = np.zeros(last - first, np.float32)
        if self.audio_per_frame:
            piece = np.zeros(0, np.float32) if audio is None else np.asarray(audio, np.float32).reshape(-1)
            piece = piece[: last - first]
        else:
            piece = self.audio[first:last]
        samples[: len(piece)] = np.clip(piece, -1.0, 1.0)
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = self.sampling_rate
        frame.pts = first
        for packet in self._audio_stream.encode(frame):
            self._container.mux(packet)

    def _finish(self) -> None:
        for stream in (self._video, self._audio_stream):
            if stream is not None:
                for packet in stream.encode(None):
                    self._container.mux(packet)
        self._container.close()
        self._container = None

    def close(self) -> str:
        """Finish the file (and, unless live, give it its name and the mode a plain `open()` gives)."""
        if self.frames_written == 0:
            self.abort()
            raise ValueError("there are no frames to write")
        try:
            self._finish()
            if not self.live:
                os.chmod(self._target, default_file_mode())
                os.replace(self._target, self.path)
        except BaseException:
            self._remove_target()
            raise
        return self.path

    def abort(self) -> None:
        """Stop: a live file keeps the frames written so far (playable); otherwise nothing is left behind."""
        if self._container is not None:
            if self.live and self.frames_written:
                try:
                    self._finish()
                    return
                except Exception:
                    pass
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        self._remove_target()

    def _remove_target(self) -> None:
        if self._target is not None and os.path.exists(self._target):
            os.remove(self._target)


def export_to_video_with_audio(
    frames: FramesInput,
    audio: Optional[np.ndarray],
    path: str,
    fps: int = FPS,
    sampling_rate: int = SAMPLING_RATE,
    size: Optional[int] = VIDEO_SIZE,
    overwrite: bool = False,
) -> str:
    """Write frames and their audio as an MP4 (H.264 yuv420p + AAC) that plays in browsers.

    `frames` are (num_frames, height, width, 3) floats in [0, 1] or uint8, or PIL images; `size` scales them
    (256 by default: the original's x2 enlargement; None keeps them). The audio is cut or zero-padded to the
    video's length. The file is written under a temporary name and renamed when complete (see `VideoWriter`,
    which writes frames as they come).
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
        if frames.ndim == 4 and frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):
            frames = frames.transpose(0, 2, 3, 1)
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"frames must be (num_frames, height, width, 3), got shape {frames.shape}")
    if len(frames) == 0:
        raise ValueError("there are no frames to write")
    with VideoWriter(path, audio, fps=fps, sampling_rate=sampling_rate, size=size, overwrite=overwrite) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def save_image(image: PIL.Image.Image, path: str) -> str:
    """Save an image under a temporary name and rename it when complete (the format from the file's ending)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the folder for {path} does not exist: {directory}")
    with _written_in_place_of(path, os.path.splitext(path)[1].lower() or ".png") as temporary:
        image.save(temporary)
    return path


def save_frames(frames: FramesInput, directory: str, size: Optional[int] = None) -> List[str]:
    """Save frames as numbered PNGs (frame_00000.png, ...) in `directory`, created if needed."""
    if len(frames) == 0:
        raise ValueError("there are no frames to write")
    os.makedirs(directory, exist_ok=True)
    return [save_frame(frame, directory, index, size) for index, frame in enumerate(frames)]


def save_frame(frame, directory: str, index: int, size: Optional[int] = None) -> str:
    """Save one frame as `directory/frame_{index:05d}.png` (written under a temporary name, then renamed)."""
    return save_image(
        PIL.Image.fromarray(_to_uint8_image(frame, size)), os.path.join(directory, f"frame_{index:05d}.png")
    )


def read_speech_stream(stream, raw_rate: int = SAMPLING_RATE, raw_channels: int = 1, block: int = 4096):
    """Speech from a byte stream (a pipe: `espeak-ng --stdout ... | diffused-heads generate --audio -`) as it
    arrives: `(sampling_rate, chunks)`, the chunks `(samples, channels)` float32 arrays, each made of the bytes that
    had arrived. A WAV stream (PCM 8/16/24/32-bit or float, its header read first; the data's size may be unknown)
    gives its own rate and channels; anything else is raw signed 16-bit little-endian samples at `raw_rate` with
    `raw_channels`. A stream that ends in the middle of a sample drops that sample's bytes."""
    read = getattr(stream, "read1", stream.read)
    head = b""
    while len(head) < 12:
        more = read(12 - len(head))
        if not more:
            break
        head += more
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        rate, channels, width, is_float, rest = _wav_stream_header(stream, read)
    else:
        if raw_rate <= 0 or raw_channels < 1:
            raise MediaError(f"raw speech needs a positive rate and channel count, got {raw_rate} and {raw_channels}")
        rate, channels, width, is_float, rest = raw_rate, raw_channels, 2, False, head
    frame_bytes = width * channels

    def chunks():
        pending = rest
        while True:
            usable = len(pending) - len(pending) % frame_bytes
            if usable:
                yield _pcm_to_float(pending[:usable], width, is_float).reshape(-1, channels)
                pending = pending[usable:]
            more = read(block)
            if not more:
                return
            pending += more

    return rate, chunks()


def _wav_stream_header(stream, read):
    """The fmt chunk of a WAV stream whose first 12 bytes are read, up to the data chunk: (rate, channels, bytes per
    sample, float, bytes of data already read)."""
    import struct

    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = read(count - len(data))
            if not more:
                raise MediaError("the WAV stream ends inside its header")
            data += more
        return data

    fmt = None
    while True:
        chunk_id, size = struct.unpack("<4sI", exactly(8))
        if chunk_id == b"data":
            break
        body = exactly(size + size % 2)
        if chunk_id == b"fmt ":
            fmt = list(struct.unpack("<HHIIHH", body[:16]))
            if fmt[0] == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the kind is the sub-format's
                fmt[0] = struct.unpack("<H", body[24:26])[0]
    if fmt is None:
        raise MediaError("the WAV stream has no fmt chunk before its data")
    tag, channels, rate, _, _, bits = fmt
    if tag not in (1, 3) or bits not in (8, 16, 24, 32) or (tag == 3 and bits != 32) or channels < 1 or rate < 1:
        raise MediaError(f"the WAV stream's format is not PCM or float samples (format {tag}, {bits} bits)")
    return rate, channels, bits // 8, tag == 3, b""


def _pcm_to_float(data: bytes, width: int, is_float: bool) -> np.ndarray:
    if is_float:
        return np.frombuffer(data, "<f4").astype(np.float32)
    if width == 1:
        return (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return values.astype(np.float32) / float(1 << 23)
    kind = {2: "<i2", 4: "<i4"}[width]
    return np.frombuffer(data, kind).astype(np.float32) / float(2 ** (8 * width - 1))
