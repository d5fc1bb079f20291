"""Reading identity frames and speech from media files, and writing talking-head videos.

No system ffmpeg and no torchaudio: images go through Pillow, audio through soundfile (WAV, FLAC, OGG,
MP3) or PyAV (AAC/M4A and the audio track of MP4, MOV, MKV, WebM), videos through PyAV, which bundles
FFmpeg's libraries.
"""

import contextlib
import os
import random
import tempfile
from fractions import Fraction
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .hub.pipeline_diffused_heads import resample_audio

SAMPLING_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLING_RATE // FPS
# The background of the CREMA-D crops the model was trained on; transparent pixels are filled with it.
GREEN_BACKGROUND = (0, 177, 64)
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}


class MediaError(ValueError):
    """A media file that cannot be used, with a message that names the file and the problem."""


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


def square(image: PIL.Image.Image, resize: str = "crop", log: Callable[[str], None] = print) -> PIL.Image.Image:
    """A non-square image centre-cropped to a square (`resize="crop"`), or left whole (`"stretch"`)."""
    if resize not in ("crop", "stretch"):
        raise ValueError(f"resize must be 'crop' or 'stretch', got {resize!r}")
    width, height = image.size
    if width == height or resize == "stretch":
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    log(f"note: the {width}x{height} identity image was centre-cropped to {side}x{side} (--resize stretch keeps all)")
    return image.crop((left, top, left + side, top + side))


def random_frame_index(path: str, seed: Optional[int]) -> int:
    """The frame `random_frame=True` takes from a video: drawn with `seed` among all its frames."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for _ in container.decode(stream))
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as a video: {error}") from None
    if total < 1:
        raise MediaError(f"{path} has no video frames")
    return random.Random(seed).randrange(total)


def _video_frame(path: str, frame: Optional[int], random_frame: bool, seed: Optional[int]) -> PIL.Image.Image:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            if random_frame:
                frame = random_frame_index(path, seed)
            wanted, count = frame or 0, 0
            for decoded in container.decode(stream):
                if count == wanted:
                    return decoded.to_image().convert("RGB")
                count += 1
            raise MediaError(f"{path} has no frame {wanted} (it has {count} frames)")
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as a video: {error}") from None


def read_image(path: str) -> PIL.Image.Image:
    """An image file as 8-bit RGB, upright, whatever its mode (see `to_rgb`); `MediaError` if it is none."""
    _check_file(path, "image")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise MediaError(f"{path} is not an image that can be read ({error})") from None


def read_video_frames(path: str, start: int = 0, count: int = 1) -> List[PIL.Image.Image]:
    """Up to `count` frames of a video from frame `start` on (at least that one, or `MediaError`)."""
    import av

    _check_file(path, "video")
    frames = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            for index, decoded in enumerate(container.decode(video=0)):
                if index >= start:
                    frames.append(decoded.to_image().convert("RGB"))
                if len(frames) == count:
                    break
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as a video: {error}") from None
    if not frames:
        raise MediaError(f"{path} has no frame {start}")
    return frames


def load_identity_frame(
    path: str,
    frame: Optional[int] = None,
    random_frame: bool = False,
    resize: str = "crop",
    seed: Optional[int] = None,
    log: Callable[[str], None] = print,
) -> PIL.Image.Image:
    """The identity frame from an image (PNG, JPEG, WebP, BMP, ...) or a video file, as a square RGB image.

    Args:
        path: The image or video file.
        frame: For a video, the index of the frame to take (default: the first).
        random_frame: For a video, take a random frame (reproducible with `seed`).
        resize: `"crop"` centre-crops a non-square image to a square; `"stretch"` keeps it whole (the
            pipeline then stretches it, as the original code did).
        log: Where notes (such as the crop) are reported.
    """
    _check_file(path, "identity image")
    if frame is not None and frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        image = _video_frame(path, frame, random_frame, seed)
    else:
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                image = to_rgb(opened)
        except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
            try:
                image = _video_frame(path, frame, random_frame, seed)
            except MediaError:
                raise MediaError(f"{path} is not an image or video that can be read ({error})") from None
        else:
            if frame is not None or random_frame:
                raise ValueError("frame and random_frame apply to videos only")
    if min(image.size) < 8:
        raise MediaError(f"the identity image {path} is too small ({image.size[0]}x{image.size[1]})")
    return square(image, resize, log)


# --------------------------------------------------------------------------------------------------
# Audio


def _read_with_soundfile(path: str):
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None
    return data.mean(axis=1), rate


def _read_with_av(path: str):
    import av

    try:
        with av.open(path) as container:
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
    except av.FFmpegError as error:
        raise MediaError(f"{path} could not be read as audio: {error}") from None
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), rate


def load_audio(
    path: str,
    start: float = 0.0,
    duration: Optional[float] = None,
    sampling_rate: int = SAMPLING_RATE,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """Speech from any common audio or video file as mono float32 at `sampling_rate` (16 kHz by default).

    Channels are averaged; other sample rates are converted with a band-limited resampler. `start` and
    `duration` (seconds) select a part. Silence is allowed but reported. (How long a clip the model handles
    well is the model's business: the pipeline warns about audio longer than its `trained_clip_seconds`.)
    """
    _check_file(path, "audio file")
    if start < 0 or (duration is not None and duration <= 0):
        raise ValueError(f"start must be >= 0 and duration > 0, got start={start}, duration={duration}")
    decoded = _read_with_soundfile(path)
    if decoded is None:
        decoded = _read_with_av(path)
    samples, rate = decoded
    if samples.size == 0:
        raise MediaError(f"{path} holds no audio samples")
    first = int(round(start * rate))
    if first >= len(samples):
        raise MediaError(f"--start {start:g}s is beyond the end of {path} ({len(samples) / rate:.2f}s)")
    last = len(samples) if duration is None else min(len(samples), first + int(round(duration * rate)))
    samples = samples[first:last]
    if not np.isfinite(samples).all():
        raise MediaError(f"{path} holds NaN or infinite samples")
    waveform = resample_audio(torch.from_numpy(np.ascontiguousarray(samples, np.float32)), rate, sampling_rate)
    waveform = waveform.numpy().astype(np.float32)
    seconds = len(waveform) / sampling_rate
    if len(waveform) < SAMPLES_PER_FRAME * sampling_rate // SAMPLING_RATE:
        raise MediaError(f"{path} is too short ({seconds * 1000:.0f} ms); one video frame needs 40 ms of audio")
    if np.abs(waveform).max() < 1e-4:
        if first > 0 or last < len(samples):
            part = f"the part of {path} from {first / rate:g}s to {last / rate:g}s"
        else:
            part = path
        log(f"warning: {part} is silent; the face will not speak")
    return waveform


# --------------------------------------------------------------------------------------------------
# Video


FramesInput = Union[np.ndarray, torch.Tensor, Sequence[PIL.Image.Image]]


def _frames_to_uint8(frames: FramesInput, size: Optional[int]) -> List[np.ndarray]:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
        if frames.ndim == 4 and frames.shape[1] in (1, 3) and frames.shape[-1] not in (1, 3):
            frames = frames.transpose(0, 2, 3, 1)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (num_frames, height, width, 3), got shape {frames.shape}")
        if frames.dtype != np.uint8:
            frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        images = [PIL.Image.fromarray(f) for f in frames]
    else:
        images = [f.convert("RGB") for f in frames]
    if not images:
        raise ValueError("there are no frames to write")
    if size is not None:
        images = [im.resize((size, size), PIL.Image.BICUBIC) if im.size != (size, size) else im for im in images]
    if images[0].size[0] % 2 or images[0].size[1] % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {images[0].size}")
    return [np.asarray(im) for im in images]


def _check_output(path: str, overwrite: bool) -> str:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
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
    handle, temporary = tempfile.mkstemp(suffix=suffix, prefix=".partial-", dir=directory)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def export_to_video_with_audio(
    frames: FramesInput,
    audio: Optional[np.ndarray],
    path: str,
    fps: int = FPS,
    sampling_rate: int = SAMPLING_RATE,
    size: Optional[int] = 256,
    overwrite: bool = False,
) -> str:
    """Write frames and their audio as an MP4 (H.264 yuv420p + AAC) that plays in browsers.

    `frames` are (num_frames, height, width, 3) floats in [0, 1] or uint8, or PIL images; `size` scales them
    (256 by default: the original's x2 enlargement; None keeps them). The audio is cut or zero-padded to the
    video's length. The file is written under a temporary name and renamed when complete.
    """
    images = _frames_to_uint8(frames, size)
    _check_output(path, overwrite)
    import av

    with _written_in_place_of(path, ".mp4") as temporary:
        with av.open(temporary, mode="w", format="mp4") as container:
            video = container.add_stream("libx264", rate=Fraction(fps))
            video.width, video.height = images[0].shape[1], images[0].shape[0]
            video.pix_fmt = "yuv420p"
            video.options = {"crf": "18", "preset": "medium"}
            audio_stream = None
            if audio is not None:
                audio_stream = container.add_stream("aac", rate=sampling_rate)
                audio_stream.layout = "mono"
            for image in images:
                for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
            if audio_stream is not None:
                samples = np.zeros(round(len(images) * sampling_rate / fps), np.float32)
                clip = np.asarray(audio, np.float32).reshape(-1)[: len(samples)]
                samples[: len(clip)] = np.clip(clip, -1.0, 1.0)
                chunk = 1024
                for offset in range(0, len(samples), chunk):
                    piece = samples[offset : offset + chunk][None]
                    frame = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
                    frame.sample_rate = sampling_rate
                    frame.pts = offset
                    for packet in audio_stream.encode(frame):
                        container.mux(packet)
                for packet in audio_stream.encode(None):
                    container.mux(packet)
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
    images = _frames_to_uint8(frames, size)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(os.path.join(directory, f"frame_{index:05d}.png"))
        PIL.Image.fromarray(image).save(paths[-1])
    return paths
