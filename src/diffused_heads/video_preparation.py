"""One talking-head video made into training clips, in named passes over its frames.

1. `detect_and_follow`: the faces of every frame and the scene cuts; one face followed through the video
   (`faces.follow_face`), split at cuts and gaps; parts too short or crowded with faces of similar size left out.
2. `mesh_faces`: the face mesh of the followed face in each kept part.
3. `align_and_smooth`: each frame's similarity transform onto the identity template from five stable mesh
   points, smoothed over time in the source's own clock; the mouth box of every aligned frame.
4. `write_clips`: the aligned frames (the person put on the training green unless the background is kept)
   written a frame at a time into the prepared dataset with their speech and mouth boxes, and how still the head
   is in what was written.

`VideoPreparer` runs the passes on one video with the options of a `prepare-dataset` run and says, for each part
left out, why.
"""

import contextlib
import dataclasses
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from .errors import MediaError
from .media import FPS, SAMPLES_PER_FRAME

# A scene cut: a frame whose 64x64 grey thumbnail differs from the previous one's by more than this (mean
# absolute difference, 0-255) and by more than SCENE_CUT_RATIO times the clip's median change.
SCENE_CUT, SCENE_CUT_RATIO = 20.0, 4.0
CROWDED_SHARE = 0.5  # a part where another face of similar size shows in more frames than this is dropped
SILENT_DBFS = -50.0  # speech quieter than this (RMS, dB below full scale) counts as silence

# The video's frames from the first, `(index, shown_at_seconds, rgb)`, up to a limit.
FrameReader = Callable[[int], Iterator[Tuple[int, float, np.ndarray]]]


def speaker_of(relative: str, how: str) -> str:
    stem = os.path.splitext(os.path.basename(relative))[0]
    if how == "folder":
        folder = os.path.dirname(relative)
        return folder.replace(os.sep, "/") if folder else stem
    if how == "prefix":
        return stem.split("_")[0]
    return os.path.splitext(relative)[0].replace(os.sep, "/")


def clip_id(relative: str) -> str:
    """A file-name-safe id of a video: its path under RAW without the extension."""
    stem = os.path.splitext(relative)[0].replace(os.sep, "__")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    import PIL.Image

    return np.asarray(PIL.Image.fromarray(rgb).convert("L").resize((64, 64), PIL.Image.BILINEAR), np.float32)


def scene_cuts(changes: List[float]) -> List[int]:
    """The frames that start a new scene, from each frame's change against the one before."""
    if len(changes) < 2:
        return []
    typical = float(np.median(changes[1:]))
    return [i for i, change in enumerate(changes) if i and change > max(SCENE_CUT, SCENE_CUT_RATIO * typical)]


@contextlib.contextmanager
def _quiet(name: str):
    """The warnings of one logger that this thread makes held back meanwhile (other threads', and errors, still
    pass; the logger's level is left alone)."""
    thread = threading.get_ident()

    def allowed(record: logging.LogRecord) -> bool:
        return record.thread != thread or record.levelno >= logging.ERROR

    named = logging.getLogger(name)
    named.addFilter(allowed)
    try:
        yield
    finally:
        named.removeFilter(allowed)


def loudness_dbfs(waveform: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))
    return 20 * np.log10(max(rms, 1e-10))


def left_out(relative: str, reason: str) -> dict:
    return {"source": relative, "reason": reason}


# --------------------------------------------------------------------------------------------------
# The passes


@dataclass
class Detection:
    """What pass 1 found: every frame's face boxes and time, and the parts of the video with one face followed."""

    boxes: list
    times: List[float]
    segments: list


@dataclass
class Plan:
    """One part of the video to write: its followed face, mesh, smoothed transforms and mouth boxes."""

    segment: object
    mesh: np.ndarray
    matrices: np.ndarray
    mouth: np.ndarray
    jitter_in: float
    found: list = field(default_factory=list)  # the landmarks found again in the written frames


def detect_and_follow(
    read: FrameReader, limit: int, relative: str, max_gap: int, min_frames: int
) -> Tuple[Optional[Detection], List[dict]]:
    """Pass 1: the faces of the first `limit` frames and the scene cuts; the parts with one face followed (None
    where there are none), and the parts left out."""
    from .faces import detect_faces, follow_face

    boxes, changes, times, previous = [], [], [], None
    for _, shown, frame in read(limit):
        times.append(shown)
        boxes.append(detect_faces(frame))
        thumbnail = _thumbnail(frame)
        changes.append(0.0 if previous is None else float(np.abs(thumbnail - previous).mean()))
        previous = thumbnail
    if not boxes:
        return None, [left_out(relative, "unreadable: no video frames")]
    dropped, segments = [], []
    for segment in follow_face(boxes, scene_cuts(changes), max_gap=max_gap):
        where = f"frames {segment.start}-{segment.end - 1}"
        if segment.end - segment.start < min_frames:
            dropped.append(left_out(relative, f"too short: {where} ({segment.end - segment.start})"))
        elif segment.crowded > CROWDED_SHARE * segment.found:
            dropped.append(left_out(relative, f"several faces: {where} show faces of similar size"))
        else:
            segments.append(segment)
    with_face = sum(bool(found) for found in boxes)
    if not segments and with_face < min(min_frames, len(boxes) / 2):
        reason = "none found" if not with_face else f"one in only {with_face} of {len(boxes)} frames"
        return None, [left_out(relative, f"no face: {reason}")]
    if not segments:
        return None, dropped
    return Detection(boxes, times, segments), dropped


def mesh_faces(read: FrameReader, segments: list) -> List[np.ndarray]:
    """Pass 2: the face mesh `(frames, points, 2)` of each part's followed face (NaN where it was not found)."""
    from .faces import MESH_POINTS, FaceModels, face_mesh

    models = FaceModels.shared()
    wanted = {}
    for number, segment in enumerate(segments):
        for offset, box in enumerate(segment.boxes):
            if box is not None:
                wanted[segment.start + offset] = (number, box)
    meshes = [np.full((s.end - s.start, MESH_POINTS, 2), np.nan) for s in segments]
    for index, _, frame in read(max(s.end for s in segments)):
        if index in wanted:
            number, box = wanted[index]
            points = face_mesh(models, frame, box)
            if points is not None:
                meshes[number][index - segments[number].start] = points
    return meshes


def align_and_smooth(
    detection: Detection, meshes: List[np.ndarray], target: np.ndarray, smoothing: int, size: int, relative: str
) -> Tuple[List[Plan], List[dict]]:
    """Pass 3: each part's transforms onto `target` (the template's five points at the output size), smoothed over
    `smoothing` frames on each side in the source's own time, and the mouth box of every aligned frame; parts where
    the mesh missed most frames are left out."""
    from .faces import (
        MESH_INDICES,
        OUTER_LIPS,
        apply_transform,
        fill_missing,
        landmark_speed,
        similarity_transform,
        smooth_transforms,
    )

    plans, dropped = [], []
    for segment, mesh in zip(detection.segments, meshes):
        seen = int((~np.isnan(mesh).any(axis=(1, 2))).sum())
        if seen < 0.5 * len(mesh):
            where = f"frames {segment.start}-{segment.end - 1}"
            dropped.append(left_out(relative, f"no face: the face mesh missed most of {where}"))
            continue
        mesh = fill_missing(mesh)
        stable = mesh[:, list(MESH_INDICES)]
        raw_matrices = np.stack([similarity_transform(p, target) for p in stable])
        shown = np.asarray(detection.times[segment.start : segment.end])
        matrices = smooth_transforms(raw_matrices, smoothing, shown)
        scale = float(np.mean(np.hypot(matrices[:, 0, 0], matrices[:, 1, 0])))
        lips = np.stack([apply_transform(m, p[list(OUTER_LIPS)]) for m, p in zip(matrices, mesh)])
        mouth = np.concatenate([lips.min(axis=1), lips.max(axis=1)], axis=1).clip(0, size)
        plans.append(Plan(segment, mesh, matrices, mouth, landmark_speed(stable) * scale))
    return plans, dropped


@dataclass
class PreparationSettings:
    """The options of a `prepare-dataset` run that shape each video's clips."""

    output: str  # the prepared dataset's folder
    size: int = 128  # frame size in pixels
    scale: float = 1.0  # the face's size against the model's template
    min_seconds: float = 1.0  # shorter parts are left out
    max_gap: int = 5  # frames a face may be missing before the clip is split
    smoothing: float = 0.0  # of the alignment over time (see `align_and_smooth`)
    background: Optional[tuple] = None  # the colour behind the person (RGB); None: the template's green
    keep_background: bool = False
    everyone: bool = False
    segmenter: str = "general"
    speaker_from: str = "folder"


def write_clips(
    read: FrameReader,
    detection: Detection,
    plans: List[Plan],
    waveform: np.ndarray,
    relative: str,
    settings: PreparationSettings,
) -> Tuple[List[dict], List[dict]]:
    """Pass 4: every part's aligned frames written as they are made (a part cut short by an error leaves
    nothing), with its speech and mouth boxes. Returns the manifest entries of the clips and the parts left out:
    those the video no longer reached in this pass (a stream that decodes fewer frames than it did in the passes
    before), each with its reason."""
    from . import dataset
    from .faces import MESH_INDICES, FaceModels, FoundFace, align_frame, box_corners, face_mesh, landmark_speed

    models = FaceModels.shared()
    base = clip_id(relative)
    clips = []
    starts = {plan.segment.start: plan for plan in plans}
    writer, plan, name = None, None, None
    try:
        for index, _, frame in read(max(p.segment.end for p in plans)):
            if index in starts:
                plan = starts[index]
                name = base if len(plans) == 1 else f"{base}-{plan.segment.start:06d}"
                writer = dataset.ClipWriter(
                    settings.output, name, plan.segment.end - plan.segment.start, settings.size
                )
            if writer is None:
                continue
            offset = index - plan.segment.start
            followed = plan.segment.boxes[offset]
            others = [box_corners(b) for b in detection.boxes[index] if b != followed]
            face = FoundFace(plan.mesh[offset][list(MESH_INDICES)], plan.mesh[offset], others)
            aligned = align_frame(
                frame,
                plan.matrices[offset],
                settings.size,
                settings.background,
                settings.keep_background,
                None if settings.everyone else face,
                settings.segmenter,
            )
            writer.write_frame(aligned)
            # The landmarks found again in the aligned frame: how still the head is in what was written.
            points = face_mesh(models, aligned, (0, 0, settings.size, settings.size))
            plan.found.append(np.full((5, 2), np.nan) if points is None else points[list(MESH_INDICES)])
            if offset == len(plan.matrices) - 1:
                start, end = plan.segment.start, plan.segment.end
                writer.close(waveform[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME], plan.mouth)
                clips.append(
                    {
                        "id": name,
                        "frames": end - start,
                        "speaker": speaker_of(relative, settings.speaker_from),
                        "source": relative.replace(os.sep, "/"),
                        "start_frame": start,
                        "jitter_in_px": round(plan.jitter_in, 3),
                        "jitter_out_px": round(landmark_speed(np.stack(plan.found)), 3),
                    }
                )
                writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:  # the video ended inside this part: nothing of it is kept
        writer.abort()
    made = {clip["start_frame"] for clip in clips}
    dropped = [
        left_out(
            relative,
            f"ended early: frames {p.segment.start}-{p.segment.end} were not reached in the last pass (the video "
            "decoded fewer frames than in the passes before)",
        )
        for p in plans
        if p.segment.start not in made
    ]
    return clips, dropped


# --------------------------------------------------------------------------------------------------
# One video


def read_frames(path: str) -> FrameReader:
    """A reader of the video at `path` that decodes it again from the start at each pass."""
    from .media import iter_video_frames_at

    def read(limit: int):
        for index, (shown, frame) in enumerate(iter_video_frames_at(path)):
            if index >= limit:
                return
            yield index, shown, frame

    return read


class VideoPreparer:
    """Prepares one video at a time with the options of a `prepare-dataset` run (see `prepare_dataset`)."""

    def __init__(self, settings: PreparationSettings, template):
        """`template`: where the model wants the face (`faces.IdentityTemplate`), and its green."""
        if settings.background is None:
            settings = dataclasses.replace(settings, background=tuple(template.background))
        self.settings = settings
        self.size = settings.size
        centre = np.array([self.size / 2, self.size / 2])
        self.target = centre + (template.scaled(self.size) - centre) * settings.scale
        self.min_frames = max(3, int(round(settings.min_seconds * FPS)))

    def __call__(self, raw: str, relative: str) -> Tuple[List[dict], List[dict]]:
        """The clips made from a video and the parts left out, each `{"source", "reason"}`."""
        from .media import load_audio, video_frame_count

        path = os.path.join(raw, relative)
        stem = os.path.splitext(path)[0]
        try:
            video_frame_count(path, decode=False)
        except MediaError as error:
            return [], [left_out(relative, f"unreadable: {error}")]
        try:
            with _quiet("diffused_heads.media"):  # silence is said here, as a reason
                waveform = load_audio(stem + ".wav" if os.path.isfile(stem + ".wav") else path)
        except MediaError as error:
            return [], [left_out(relative, f"no usable audio: {error}")]
        loudness = loudness_dbfs(waveform)
        if loudness < SILENT_DBFS:
            return [], [left_out(relative, f"silent: {loudness:.0f} dBFS")]
        try:
            return self.video(path, relative, waveform, len(waveform) // SAMPLES_PER_FRAME)
        except MediaError as error:
            return [], [left_out(relative, f"unreadable: {error}")]

    def video(self, path: str, relative: str, waveform: np.ndarray, audio_frames: int):
        read = read_frames(path)
        detection, dropped = detect_and_follow(read, audio_frames, relative, self.settings.max_gap, self.min_frames)
        if detection is None:
            return [], dropped
        meshes = mesh_faces(read, detection.segments)
        plans, more = align_and_smooth(detection, meshes, self.target, self.settings.smoothing, self.size, relative)
        dropped += more
        if not plans:
            return [], dropped
        clips, cut_short = write_clips(read, detection, plans, waveform, relative, self.settings)
        return clips, dropped + cut_short
