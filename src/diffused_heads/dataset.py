"""The prepared dataset: talking-face clips on disk as NumPy `.npy` arrays, read a frame at a time.

A prepared dataset is a folder:

    DATASET/
      manifest.json                  what is in it (below)
      clips/ID/frames.npy            uint8 (F, S, S, 3): RGB frames at 25 fps, S x S pixels, face aligned
      clips/ID/audio.npy             float32 (F * 640,): 16 kHz mono speech, exactly 640 samples per frame
      clips/ID/mouth_boxes.npy       float32 (F, 4): optional, the mouth box [x0, y0, x1, y1] in pixels of S

`manifest.json` holds `{"format": "diffused-heads-dataset", "version": 1, "size": S, "fps": 25,
"sampling_rate": 16000, "clips": [...], "dropped": [...], "summary": {...}}`; each clip is `{"id", "frames",
"speaker", "split" ("train" or "test"), "source", "start_frame"}` and each dropped source `{"source",
"reason"}`. Any program that writes these files (`numpy.save`) makes a dataset `diffused-heads train` reads.

`.npy` is NumPy's own documented format (a short header, then the raw array), so a frame is read with one
seek and one read: training holds only the frames of the batch it is making, however many clips there are.
"""

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import numpy as np

from .errors import MediaError
from .media import FPS, SAMPLES_PER_FRAME, SAMPLING_RATE, VIDEO_EXTENSIONS, load_audio, read_video

FORMAT = "diffused-heads-dataset"
VERSION = 1
MANIFEST = "manifest.json"
CLIPS = "clips"
SPLITS = ("train", "test")
NUM_CONTEXT_FRAMES = 3  # a clip needs a target frame and its two motion frames


class DatasetError(MediaError):
    """A prepared dataset that cannot be read, said in one line."""


# --------------------------------------------------------------------------------------------------
# Writing


def clip_folder(dataset: str, clip_id: str) -> str:
    return os.path.join(dataset, CLIPS, clip_id)


class ClipWriter:
    """Writes one clip's arrays frame by frame into a temporary folder, moved into place by `close()`: a clip
    folder exists only complete."""

    def __init__(self, dataset: str, clip_id: str, num_frames: int, size: int):
        self.target = clip_folder(dataset, clip_id)
        self.temporary = self.target + ".partial"
        shutil.rmtree(self.temporary, ignore_errors=True)
        os.makedirs(self.temporary)
        self.num_frames, self.size = num_frames, size
        self.frames = np.lib.format.open_memmap(
            os.path.join(self.temporary, "frames.npy"), mode="w+", dtype=np.uint8, shape=(num_frames, size, size, 3)
        )
        self.written = 0

    def write_frame(self, frame: np.ndarray) -> None:
        self.frames[self.written] = frame
        self.written += 1

    def close(self, audio: np.ndarray, mouth_boxes: Optional[np.ndarray] = None) -> str:
        if self.written != self.num_frames:
            raise ValueError(f"{self.written} frames written of {self.num_frames}")
        if len(audio) != self.num_frames * SAMPLES_PER_FRAME:
            raise ValueError(f"{len(audio)} audio samples for {self.num_frames} frames")
        self.frames.flush()
        del self.frames
        np.save(os.path.join(self.temporary, "audio.npy"), np.asarray(audio, np.float32))
        if mouth_boxes is not None:
            np.save(os.path.join(self.temporary, "mouth_boxes.npy"), np.asarray(mouth_boxes, np.float32))
        shutil.rmtree(self.target, ignore_errors=True)
        os.replace(self.temporary, self.target)
        return self.target

    def abort(self) -> None:
        self.frames = None
        shutil.rmtree(self.temporary, ignore_errors=True)


def write_manifest(dataset: str, size: int, clips: List[dict], dropped: List[dict], **extra) -> dict:
    """Write `manifest.json` (the clips, what was dropped, and a summary) and return its content."""
    frames = sum(c["frames"] for c in clips)
    summary = {
        "clips": len(clips),
        "frames": frames,
        "minutes": round(frames / FPS / 60, 2),
        "speakers": len({c["speaker"] for c in clips}),
        **{f"{split}_clips": sum(c["split"] == split for c in clips) for split in SPLITS},
        "dropped": len(dropped),
        "dropped_by_reason": count_reasons(dropped),
    }
    content = {
        "format": FORMAT,
        "version": VERSION,
        "size": size,
        "fps": FPS,
        "sampling_rate": SAMPLING_RATE,
        **extra,
        "summary": summary,
        "clips": clips,
        "dropped": dropped,
    }
    path = os.path.join(dataset, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)
    return content


def count_reasons(dropped: List[dict]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for entry in dropped:
        kind = entry["reason"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------------
# Reading


def _npy_layout(path: str):
    """(data offset, shape, dtype) of a C-ordered .npy file, read from its header."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path} is not a readable .npy array: {error}") from None
    offset, shape, dtype = mapped.offset, mapped.shape, mapped.dtype
    fortran = mapped.flags.f_contiguous and not mapped.flags.c_contiguous
    del mapped  # the mapping is closed; frames are read with plain reads
    if fortran:
        raise DatasetError(f"{path} is Fortran-ordered; save it C-ordered (numpy.save of a C-contiguous array)")
    return offset, shape, dtype


@dataclass
class ClipInfo:
    id: str
    frames: int
    speaker: str = ""
    split: str = "train"
    source: str = ""
    extra: dict = field(default_factory=dict)


class PreparedDataset:
    """A prepared dataset's manifest, and reads of single frames, audio and mouth boxes from its files."""

    def __init__(self, folder: str, split: Optional[str] = None):
        self.folder = folder
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise DatasetError(f"{folder} is no prepared dataset: it has no {MANIFEST}")
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path} could not be read: {error}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DatasetError(f"{path} is not a {FORMAT} manifest of version {VERSION}")
        if manifest.get("fps") != FPS or manifest.get("sampling_rate") != SAMPLING_RATE:
            raise DatasetError(f"{path}: the clips must be at {FPS} fps with {SAMPLING_RATE} Hz audio")
        self.manifest = manifest
        self.size = int(manifest["size"])
        known = {"id", "frames", "speaker", "split", "source"}
        self.clips = [
            ClipInfo(
                id=c["id"],
                frames=int(c["frames"]),
                speaker=str(c.get("speaker", "")),
                split=c.get("split", "train"),
                source=c.get("source", ""),
                extra={k: v for k, v in c.items() if k not in known},
            )
            for c in manifest.get("clips", [])
            if split is None or c.get("split", "train") == split
        ]
        self._layouts: Dict[str, tuple] = {}

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def num_frames(self) -> int:
        return sum(c.frames for c in self.clips)

    def path(self, clip: ClipInfo, name: str) -> str:
        return os.path.join(clip_folder(self.folder, clip.id), name)

    def _layout(self, clip: ClipInfo, name: str):
        key = clip.id + "/" + name
        if key not in self._layouts:
            self._layouts[key] = _npy_layout(self.path(clip, name))
        return self._layouts[key]

    def check(self, clip: ClipInfo) -> None:
        """Raise `DatasetError` unless the clip's files have the shapes its manifest entry says."""
        _, shape, dtype = self._layout(clip, "frames.npy")
        if dtype != np.uint8 or shape != (clip.frames, self.size, self.size, 3):
            raise DatasetError(
                f"{self.path(clip, 'frames.npy')}: expected uint8 {(clip.frames, self.size, self.size, 3)}, "
                f"found {dtype} {shape}"
            )
        _, shape, dtype = self._layout(clip, "audio.npy")
        if dtype != np.float32 or shape != (clip.frames * SAMPLES_PER_FRAME,):
            raise DatasetError(
                f"{self.path(clip, 'audio.npy')}: expected float32 ({clip.frames * SAMPLES_PER_FRAME},), "
                f"found {dtype} {shape}"
            )
        if self.has_mouth_boxes(clip):
            _, shape, _ = self._layout(clip, "mouth_boxes.npy")
            if shape != (clip.frames, 4):
                raise DatasetError(f"{self.path(clip, 'mouth_boxes.npy')}: expected ({clip.frames}, 4), found {shape}")

    def has_mouth_boxes(self, clip: ClipInfo) -> bool:
        return os.path.isfile(self.path(clip, "mouth_boxes.npy"))

    def frame(self, clip: ClipInfo, index: int) -> np.ndarray:
        """Frame `index` of a clip, `(S, S, 3)` uint8, read from disk (nothing else of the clip is read)."""
        if not 0 <= index < clip.frames:
            raise IndexError(f"clip {clip.id} has {clip.frames} frames, not {index + 1}")
        return self.frames(clip, index, 1)[0]

    def frames(self, clip: ClipInfo, start: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Frames `start` to `start + count` of a clip as `(n, S, S, 3)` uint8, in one read."""
        count = clip.frames - start if count is None else count
        offset, _, _ = self._layout(clip, "frames.npy")
        one = self.size * self.size * 3
        data = np.fromfile(
            self.path(clip, "frames.npy"), dtype=np.uint8, count=count * one, offset=offset + start * one
        )
        return data.reshape(-1, self.size, self.size, 3)

    def audio(self, clip: ClipInfo) -> np.ndarray:
        return np.load(self.path(clip, "audio.npy"))

    def mouth_boxes(self, clip: ClipInfo) -> Optional[np.ndarray]:
        return np.load(self.path(clip, "mouth_boxes.npy")) if self.has_mouth_boxes(clip) else None

    def iter_frames(self, clip: ClipInfo, chunk: int = 64) -> Iterator[np.ndarray]:
        for start in range(0, clip.frames, chunk):
            yield from self.frames(clip, start, min(chunk, clip.frames - start))


def is_prepared(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


# --------------------------------------------------------------------------------------------------
# A folder of ready clips (the older training input, and what make-dataset writes) as a prepared dataset


def clip_files(folder: str) -> List[str]:
    """The videos directly in `folder`, sorted."""
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS
    )


def convert_clip_folder(folder: str, dataset: str, size: int, test_fraction: float = 0.0, seed: int = 0, log=None):
    """Write the ready clips of `folder` (square-cropped, aligned already; `NAME.mp4` with its audio or a
    `NAME.wav`, and optionally `NAME.json` with `mouth_boxes` and `size`) as a prepared dataset at `size`,
    one clip at a time. Every clip is its own speaker."""
    if not os.path.isdir(folder):
        raise DatasetError(f"the data folder {folder} does not exist")
    paths = clip_files(folder)
    if not paths:
        raise DatasetError(f"no video clips ({', '.join(sorted(VIDEO_EXTENSIONS))}) in {folder}")
    os.makedirs(os.path.join(dataset, CLIPS), exist_ok=True)
    clips, dropped = [], []
    for path in paths:
        stem = os.path.splitext(path)[0]
        name = os.path.basename(stem)
        try:
            frames = read_video(path, size)
            audio_path = stem + ".wav" if os.path.exists(stem + ".wav") else path
            waveform = load_audio(audio_path)
        except MediaError as error:
            dropped.append({"source": os.path.basename(path), "reason": f"unreadable: {error}"})
            continue
        num_frames = min(len(frames), len(waveform) // SAMPLES_PER_FRAME)
        if num_frames < NUM_CONTEXT_FRAMES:
            dropped.append({"source": os.path.basename(path), "reason": f"too short: {num_frames} frame(s)"})
            continue
        boxes = _clip_folder_boxes(stem, num_frames, size)
        writer = ClipWriter(dataset, name, num_frames, size)
        for frame in frames[:num_frames]:
            writer.write_frame(frame)
        writer.close(waveform[: num_frames * SAMPLES_PER_FRAME], boxes)
        clips.append({"id": name, "frames": num_frames, "speaker": name, "split": "train", "source": path})
        if log:
            log(name)
    assign_splits(clips, test_fraction, seed)
    write_manifest(dataset, size, clips, dropped, prepared_from=os.path.abspath(folder))
    return clips, dropped


def _clip_folder_boxes(stem: str, num_frames: int, size: int) -> Optional[np.ndarray]:
    if not os.path.exists(stem + ".json"):
        return None
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{stem}.json could not be read: {error}") from None
    if "mouth_boxes" not in info:
        return None
    boxes = np.asarray(info["mouth_boxes"], np.float32)
    source_size = float(info.get("size", 0) or 0)
    if source_size <= 0:
        raise DatasetError(f"{stem}.json gives mouth_boxes but no frame 'size' in pixels")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) < num_frames:
        raise DatasetError(f"{stem}.json: mouth_boxes must be one [x0, y0, x1, y1] per frame")
    return boxes[:num_frames] * (size / source_size)


def assign_splits(clips: List[dict], test_fraction: float, seed: int) -> None:
    """Put whole speakers in the test split: a `test_fraction` of them (at least one when there are two or
    more speakers and the fraction is above 0), drawn with `seed`; the choice depends only on the speakers."""
    speakers = sorted({c["speaker"] for c in clips})
    count = 0
    if test_fraction > 0 and len(speakers) > 1:
        count = min(len(speakers) - 1, max(1, round(test_fraction * len(speakers))))
    order = np.random.default_rng(seed).permutation(len(speakers))
    test = {speakers[i] for i in order[:count]}
    for clip in clips:
        clip["split"] = "test" if clip["speaker"] in test else "train"
