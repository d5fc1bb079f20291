"""Turn a photo (or a video frame) into a model-ready identity frame: aligned like the training crops, on green.

    from diffused_heads import prepare_identity
    frame = prepare_identity("photo.jpg")          # 128x128 PIL image, face aligned, background green

The released model saw only CREMA-D crops: one face, aligned, on a plain green background. The recipe is the
one the authors point to (DinoMan/face-processor): five stable landmarks (the nose base and the four eye
corners) are mapped onto the same points of a template face by the least-squares similarity transform
(rotation, uniform scale, shift), the photo is warped bilinearly, the person is segmented and composited onto
the training green. Landmarks and segmentation come from MediaPipe 0.10.14, whose wheel ships its models, so
nothing is downloaded (the `faces` extra: `pip install "diffused-heads-diffusers[faces]"`).

The default template is reconstructed from the published recipe (the mean face of face-processor's README
commands at the scale that gives its 96x128 crop, widened to a square with the face centred). The exact square
framing of the Diffused Heads clips was not published: a real frame of the training data (`reference=`)
settles it, and a model folder can carry such a calibrated template (`identity_template.json`).
"""

import contextlib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .errors import ArgumentError, MediaError
from .media import GREEN_BACKGROUND, VIDEO_EXTENSIONS, read_image, read_video_frames, to_rgb

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "identity_template.json"
FACES_EXTRA = (
    'face preparation needs the faces extra: pip install "diffused-heads-diffusers[faces]" (MediaPipe 0.10.14, '
    "Python 3.11 or 3.12)"
)

# The five stable points of the 68-point iBUG scheme, in this order: nose base (33), right eye outer (36) and
# inner (39) corner, left eye inner (42) and outer (45) corner; and the MediaPipe face-mesh points at them.
STABLE_POINTS = ("nose base", "right eye outer", "right eye inner", "left eye inner", "left eye outer")
MESH_INDICES = (2, 33, 133, 362, 263)
MESH_POINTS = 468  # the face mesh's points (without the irises)
# Face-mesh points of the outer lip contour, and of each eye (outer corner, two upper, inner corner, two lower:
# the six points of the eye aspect ratio).
OUTER_LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
INNER_LIPS = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
RIGHT_EYE = (33, 160, 158, 133, 153, 144)
LEFT_EYE = (263, 387, 385, 362, 380, 373)
# face-processor's mean face (the repository-root mean_face.npy of its README commands): the five points and
# the bounding box of all 68 points, and its crop recipe (scale and offsets of the README's commands).
MEAN_FACE_POINTS = np.array(
    [(116.950, 123.796), (45.512, 43.462), (84.545, 45.623), (143.671, 43.024), (182.164, 39.638)]
)
MEAN_FACE_BOX = ((0.19, 0.187), (224.49, 244.16))
CROP_SCALE, OFFSET_X, OFFSET_TOP, OFFSET_BOTTOM = 0.3525, 0.11, 0.335, 0.155
DETECTION_SIDE = 1280  # photos are searched for faces at most this large
# Named framings (scale factors of the template; docs/FRAMING.md): the face-processor crop made square by
# widening it (the default), the same crop made square by cutting its height, and the whole head with its hair.
FRAMING = {"recipe": 1.0, "tight": 4 / 3, "head": 0.75}
SMALL_FACE_EYES = 40  # outer eye corners closer than this in the photo (48 in the frame): a warning
# The person segmenters of the faces extra: MediaPipe's selfie segmenter (general: 256x256, landscape:
# 144x256) and its pose model's segmentation (one person, found from the body's pose).
SEGMENTERS = ("general", "landscape", "pose")
# The face mesh's face oval, in order around the face.
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149,
    150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip


@dataclass
class IdentityTemplate:
    """Where the five stable points go in a `size` x `size` identity frame, and the background colour."""

    points: List[Tuple[float, float]]
    size: int = 128
    background: Tuple[int, int, int] = GREEN_BACKGROUND
    source: str = "reconstructed from the published face-processor recipe"

    def scaled(self, size: int) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64) * (size / self.size)

    def save(self, folder: str) -> str:
        path = os.path.join(folder, TEMPLATE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**asdict(self), "points_are": list(STABLE_POINTS)}, f, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> "IdentityTemplate":
        if os.path.isdir(path):
            path = os.path.join(path, TEMPLATE_FILE)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls(
            points=[tuple(p) for p in data["points"]],
            size=int(data["size"]),
            background=tuple(int(c) for c in data["background"]),
            source=data.get("source", path),
        )


def default_template() -> IdentityTemplate:
    """The face-processor framing (96x128 at 128 px high) widened to a square with the face centred."""
    (left, top), (right, bottom) = np.asarray(MEAN_FACE_BOX) * CROP_SCALE
    left, top, right, bottom = int(left), int(top), int(right), int(bottom)
    width, height = right - left, bottom - top
    points = MEAN_FACE_POINTS * CROP_SCALE + (int(OFFSET_X * width) - left, int(OFFSET_TOP * height) - top)
    crop_width, crop_height = int(width * (1 + 2 * OFFSET_X)), int(height * (1 + OFFSET_TOP + OFFSET_BOTTOM))
    points[:, 0] += (crop_height - crop_width) / 2  # centre the crop in a square as high as it is
    return IdentityTemplate(points=[tuple(map(float, p)) for p in points], size=crop_height)


def model_template(model_folder: Optional[str]) -> Optional[IdentityTemplate]:
    """The calibrated template stored with a model, if it has one."""
    if model_folder and os.path.isfile(os.path.join(model_folder, TEMPLATE_FILE)):
        return IdentityTemplate.load(model_folder)
    return None


# --------------------------------------------------------------------------------------------------
# Landmarks


class FaceModels:
    """MediaPipe's face detector, face mesh and person segmenter, created once and reused."""

    _shared = None

    def __init__(self):
        # protobuf's deprecation notice about MediaPipe's own calls, at every use
        warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)
        with _native_stderr_silenced():
            try:
                import mediapipe
            except ImportError:
                raise MediaError(FACES_EXTRA) from None
            solutions = mediapipe.solutions
            self.detector = solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
            self.mesh = solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, min_detection_confidence=0.3
            )
            self.segmenter = solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            blank = np.zeros((64, 64, 3), np.uint8)  # the first run of each prints its start-up lines
            for model in (self.detector, self.mesh, self.segmenter):
                model.process(blank)
        self._solutions = solutions
        self._segmenters = {"general": self.segmenter}

    def segmenter_of(self, kind: str):
        """The person segmenter `kind` (see SEGMENTERS), made on first use."""
        if kind not in SEGMENTERS:
            raise ArgumentError("segmenter", f"must be one of {', '.join(SEGMENTERS)}, got {kind!r}")
        if kind not in self._segmenters:
            with _native_stderr_silenced():
                if kind == "landscape":
                    model = self._solutions.selfie_segmentation.SelfieSegmentation(model_selection=1)
                else:
                    model = self._solutions.pose.Pose(
                        static_image_mode=True, model_complexity=1, enable_segmentation=True
                    )
                model.process(np.zeros((64, 64, 3), np.uint8))
            self._segmenters[kind] = model
        return self._segmenters[kind]

    def segment(self, rgb: np.ndarray, kind: str = "general") -> np.ndarray:
        """How much each pixel of `rgb` belongs to a person, `(H, W)` float32 in [0, 1]."""
        mask = self.segmenter_of(kind).process(np.ascontiguousarray(rgb)).segmentation_mask
        if mask is None:  # the pose model found nobody
            return np.zeros(rgb.shape[:2], np.float32)
        return np.clip(np.asarray(mask, np.float32), 0.0, 1.0)

    @classmethod
    def shared(cls) -> "FaceModels":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared


@contextlib.contextmanager
def _native_stderr_silenced():
    """MediaPipe's C++ layers (TensorFlow Lite, absl) write start-up lines straight to the process's stderr,
    past Python's logging: point that file descriptor at the null device meanwhile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (an embedded interpreter, say)
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def faces_available() -> bool:
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return False
    return True


def _boxes(models: FaceModels, rgb: np.ndarray) -> List[Tuple[float, float, float, float]]:
    """Face boxes (x0, y0, x1, y1) in pixels, largest first."""
    height, width = rgb.shape[:2]
    found = models.detector.process(rgb).detections or []
    boxes = []
    for detection in found:
        box = detection.location_data.relative_bounding_box
        boxes.append(
            (box.xmin * width, box.ymin * height, (box.xmin + box.width) * width, (box.ymin + box.height) * height)
        )
    return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def face_mesh(models: FaceModels, rgb: np.ndarray, box) -> Optional[np.ndarray]:
    """All 468 face-mesh points `(468, 2)` (pixels) of the face in `box`, from the mesh run on a crop around it;
    None when the mesh finds no face there."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = box
    side = 2.2 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    if right - left < 8 or bottom - top < 8:
        return None
    crop = np.ascontiguousarray(rgb[top:bottom, left:right])
    result = models.mesh.process(crop).multi_face_landmarks
    if not result:
        return None
    landmarks = result[0].landmark
    return np.array([(p.x * crop.shape[1] + left, p.y * crop.shape[0] + top) for p in landmarks[:MESH_POINTS]])


ROTATIONS = {
    0: None,
    90: PIL.Image.Transpose.ROTATE_90,
    180: PIL.Image.Transpose.ROTATE_180,
    270: PIL.Image.Transpose.ROTATE_270,
}


@dataclass
class FoundFace:
    """A face found in a photo: its five stable points and all face-mesh points (pixels), and the corners of the
    other faces' boxes `(4, 2)` each (for keeping only this person)."""

    points: np.ndarray
    mesh: np.ndarray
    others: List[np.ndarray]


def find_face(image: PIL.Image.Image, face: Union[str, int] = "largest", quiet: bool = False) -> FoundFace:
    """One face of `image` (see `find_landmarks`), with its mesh and the other faces' boxes."""
    models = FaceModels.shared()
    factor = min(1.0, DETECTION_SIDE / max(image.size))
    small = (
        image
        if factor == 1.0
        else image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), PIL.Image.BILINEAR
        )
    )
    for angle, transpose in ROTATIONS.items():
        turned = small if transpose is None else small.transpose(transpose)
        rgb = np.asarray(turned)
        boxes = _boxes(models, rgb)
        if not boxes:
            continue
        index = 0 if face == "largest" else int(face)
        if index >= len(boxes):
            raise MediaError(f"face {index} was asked for, but the photo shows {len(boxes)} face(s)")
        if len(boxes) > 1:
            chosen = "the largest" if index == 0 else f"face {index} (counted from the largest)"
            if not quiet:
                logger.warning(f"the photo shows {len(boxes)} faces; using {chosen}")
        mesh = face_mesh(models, rgb, boxes[index])
        if mesh is None:
            continue
        others = [box_corners(b) for k, b in enumerate(boxes) if k != index]
        if angle:
            if not quiet:
                logger.info(f"the face was found with the photo turned by {angle} degrees")
            mesh = _unturn(mesh, angle, turned.size)
            others = [_unturn(corners, angle, turned.size) for corners in others]
        mesh = mesh / factor
        return FoundFace(mesh[list(MESH_INDICES)], mesh, [corners / factor for corners in others])
    raise MediaError("no face found in the photo (also looked with it turned by 90, 180 and 270 degrees)")


def find_landmarks(image: PIL.Image.Image, face: Union[str, int] = "largest", quiet: bool = False) -> np.ndarray:
    """The five stable points `(5, 2)` of one face in `image` (pixels), trying the photo turned if it must.

    `face` is "largest" or the index of a face counted from the largest. Raises `MediaError` if there is none.
    How many faces there were, and a turn, are logged unless `quiet`."""
    return find_face(image, face, quiet).points


def _unturn(points: np.ndarray, angle: int, turned_size: Tuple[int, int]) -> np.ndarray:
    """Map points found in the photo turned counter-clockwise by `angle` back to the photo itself."""
    width, height = turned_size
    x, y = points[:, 0], points[:, 1]
    if angle == 90:
        return np.stack([height - y, x], axis=1)
    if angle == 180:
        return np.stack([width - x, height - y], axis=1)
    return np.stack([y, width - x], axis=1)


def smoothed_video_landmarks(frames: Sequence[PIL.Image.Image], face="largest") -> np.ndarray:
    """The five points averaged over the frames given (face-processor averages a forward window of 7)."""
    found = []
    for index, frame in enumerate(frames):
        try:
            found.append(find_landmarks(frame, face=face, quiet=index > 0))
        except MediaError:
            if index == 0:
                raise
    return np.mean(found, axis=0)


# --------------------------------------------------------------------------------------------------
# Alignment and background


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the least-squares similarity (rotation, uniform scale, shift) taking source to target."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    s, t = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(t.T @ s / len(s))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(singular) @ d) / (s**2).sum(1).mean()
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def _warp(image: PIL.Image.Image, matrix: np.ndarray, size: int, fill=(0, 0, 0)) -> PIL.Image.Image:
    inverse = np.linalg.inv(np.vstack([matrix, (0, 0, 1)]))[:2]
    return image.transform(
        (size, size), PIL.Image.AFFINE, inverse.ravel().tolist(), PIL.Image.BILINEAR, fillcolor=fill
    )


def prepare_identity(image: Union[str, PIL.Image.Image, np.ndarray], **options) -> PIL.Image.Image:
    """A photo (or a frame of a video) as a model-ready identity frame: aligned, on the training background.
    The options are `align_identity`'s."""
    return align_identity(image, **options).image


def framing_scale(scale: Union[float, str]) -> float:
    """A framing's scale: a positive number, or the name of one of `FRAMING`."""
    if isinstance(scale, str):
        if scale in FRAMING:
            return FRAMING[scale]
        try:
            scale = float(scale)
        except ValueError:
            raise ArgumentError("scale", f"must be a positive number or one of {', '.join(FRAMING)}, got {scale!r}")
    if not scale > 0:
        raise ArgumentError("scale", f"must be positive, got {scale}")
    return float(scale)


@dataclass
class AlignedIdentity:
    """An identity frame, the person's mask in it (`(size, size)` in [0, 1]) and the matrix that took the photo's
    pixels to the frame's."""

    image: PIL.Image.Image
    mask: np.ndarray
    matrix: np.ndarray


def align_identity(
    image,
    template: Optional[IdentityTemplate] = None,
    size: Optional[int] = None,
    face: Union[str, int] = "largest",
    scale: Union[float, str] = 1.0,
    background: Optional[Tuple[int, int, int]] = None,
    keep_background: bool = False,
    frame: Optional[int] = None,
    segmenter: str = "general",
    everyone: bool = False,
) -> AlignedIdentity:
    """A photo (or a frame of a video) as a model-ready identity frame (aligned, on the training background), with
    the person's mask in it and the matrix that took the photo's pixels to the frame's.

    Args:
        image: A path (image or video), a PIL image or an HxWx3 uint8 array.
        template: Where the stable points go (default: the reconstruction of the published recipe; see
            `template_from_reference` and `model_template`).
        size: Output size (default: the template's, 128).
        face: "largest" (default; a warning names how many faces there are) or the index of a face from the largest.
        scale: Framing: below 1 shows more around the face, above 1 less; or a name of `FRAMING` ("recipe" = 1,
            "tight", "head").
        background: Colour put behind the person (default: the template's, the training green).
        keep_background: Only align; keep the photo's background.
        frame: For a video, the frame to use (its landmarks are averaged with the next 6 frames').
        segmenter: Which person segmenter finds the person (`SEGMENTERS`; "general" measured best).
        everyone: Keep every person the segmenter finds, not only the one whose face is used.
    """
    template = template or default_template()
    size = size or template.size
    scale = framing_scale(scale)
    if segmenter not in SEGMENTERS:
        raise ArgumentError("segmenter", f"must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
    background = tuple(background or template.background)
    photo, found = _photo_and_face(image, frame, face)
    points = found.points
    eyes = float(np.linalg.norm(points[4] - points[1]))
    if eyes < SMALL_FACE_EYES:
        logger.warning(
            f"the face is small ({eyes:.0f} px between the outer eye corners); the frame is enlarged from it "
            "and will look blurry"
        )

    # Work at a few times the output size, then shrink with a good filter.
    work = max(size, 512)
    target = template.scaled(work)
    centre = np.array([work / 2, work / 2])
    target = centre + (target - centre) * scale
    matrix = similarity_transform(points, target)
    aligned, inside, mask = render_aligned(
        photo, matrix, work, background, keep_background, found, segmenter, everyone
    )
    if inside.mean() < 0.97 and inside[work // 8 : -work // 8, work // 8 : -work // 8].min() < 0.5:
        logger.warning("the face is cut by the photo's edge; the missing part is filled with the background")
    if work != size:
        aligned = aligned.resize((size, size), PIL.Image.LANCZOS)
        mask = np.asarray(PIL.Image.fromarray(mask.astype(np.float32)).resize((size, size), PIL.Image.BILINEAR))
    return AlignedIdentity(aligned, np.clip(mask, 0.0, 1.0), matrix * (size / work))


def render_aligned(
    photo: PIL.Image.Image,
    matrix: np.ndarray,
    work: int,
    background,
    keep_background: bool = False,
    face: Optional[FoundFace] = None,
    segmenter: str = "general",
    everyone: bool = False,
) -> Tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
    """The photo warped by `matrix` (photo pixels to `work` x `work` pixels) with the person on `background`
    (or the photo's own background), the part of the frame the photo covers, and the person's mask (both
    `(work, work)` in [0, 1]). With `face` (found in the photo) only the person of that face is kept
    (`keep_one_person`), unless `everyone`."""
    zoom = math.hypot(*matrix[:, 0])  # output pixels per photo pixel
    reduce = max(1, int(1 / (2 * zoom)))  # keep at least 2 photo pixels per working pixel
    if reduce > 1:
        photo = photo.reduce(reduce)
        matrix = matrix @ np.diag([reduce, reduce, 1.0])
        if face is not None:
            face = FoundFace(face.points / reduce, face.mesh / reduce, [c / reduce for c in face.others])
    aligned = _warp(photo, matrix, work)
    inside = np.asarray(_warp(PIL.Image.new("L", photo.size, 255), matrix, work, fill=0), np.float32) / 255.0
    if keep_background:
        return aligned, inside, inside
    mask = person_mask(photo, matrix, work, segmenter, None if everyone else face)
    mask = mask * inside
    colour = np.array(background, np.float32)
    blended = np.asarray(aligned, np.float32) * mask[..., None] + colour * (1.0 - mask[..., None])
    return PIL.Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)), inside, mask


PERSON_GRID = 128  # the resolution at which the person is told from the others
# The segmenter sees this much more around the face than the frame shows (the frame is its middle): with the
# shoulders and the space around the head in view it finds the outline far better (measured on the composites
# of tests/composites.py: 99.2% of the background and 100% of the person right, against 74.7% and 100% when it
# sees only the frame).
SEGMENTATION_CONTEXT = 1.5


def person_mask(
    photo: PIL.Image.Image, matrix: np.ndarray, work: int, segmenter: str = "general", face: Optional[FoundFace] = None
) -> np.ndarray:
    """How much each pixel of the frame `matrix` makes from `photo` (`work` x `work`) shows the person: the
    segmenter runs on a view `SEGMENTATION_CONTEXT` times as wide, centred on the frame; with `face`, only the
    person of that face is kept (`keep_one_person`)."""
    centre = np.array([work / 2, work / 2])
    zoom_out = np.array([[1 / SEGMENTATION_CONTEXT, 0, 0], [0, 1 / SEGMENTATION_CONTEXT, 0], [0, 0, 1.0]])
    zoom_out[:2, 2] = centre * (1 - 1 / SEGMENTATION_CONTEXT)
    wide = zoom_out @ np.vstack([matrix, (0, 0, 1)])
    view = _warp(photo, wide[:2], work)
    mask = FaceModels.shared().segment(np.asarray(view), segmenter)
    if face is not None:
        oval = apply_transform(wide[:2], face.mesh[list(FACE_OVAL)])
        others = [apply_transform(wide[:2], corners) for corners in face.others]
        mask = keep_one_person(mask, oval, others)
    # Back to the frame: frame pixel x is view pixel centre + (x - centre) / context.
    back = [1 / SEGMENTATION_CONTEXT, 0, centre[0] * (1 - 1 / SEGMENTATION_CONTEXT)]
    back += [0, 1 / SEGMENTATION_CONTEXT, centre[1] * (1 - 1 / SEGMENTATION_CONTEXT)]
    return np.asarray(
        PIL.Image.fromarray(mask.astype(np.float32)).transform(
            (work, work), PIL.Image.AFFINE, back, PIL.Image.BILINEAR
        )
    )


def _polygon_mask(points: np.ndarray, size: int, scale: float) -> np.ndarray:
    canvas = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(canvas).polygon([tuple(p) for p in np.asarray(points) * scale], fill=1)
    return np.asarray(canvas, bool)


def _grow(region: np.ndarray, within: np.ndarray) -> np.ndarray:
    """`region` grown by one pixel (4-neighbours) inside `within`."""
    grown = region.copy()
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    return grown & within


def keep_one_person(mask: np.ndarray, oval: np.ndarray, others: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The part of a person mask `(N, N)` that belongs to the person whose face oval is `oval` (`(K, 2)` pixels):
    the segmenter's people (mask above 0.5) are shared out by growing every face at once through them, one pixel
    at a time (each pixel goes to the face that reaches it first), so that other people and anything not joined
    to this face become background, and two people who touch are parted halfway between their faces. The soft
    edge of the mask (hair) is kept where it borders this person. (The face oval is only where the growing
    starts: painting it in as person was measured to cost 1-2% of the background, as the mesh places the oval
    where a face should be even where something covers it.)"""
    size = mask.shape[0]
    grid = min(PERSON_GRID, size)
    scale = grid / size
    small = np.asarray(PIL.Image.fromarray(mask.astype(np.float32)).resize((grid, grid), PIL.Image.BILINEAR))
    face = _polygon_mask(oval, grid, scale)
    people = (small > 0.5) | face
    mine = face.copy()
    theirs = np.zeros_like(face)
    for corners in others:
        centre = corners.mean(axis=0)
        inner = centre + (corners - centre) * 0.5
        theirs |= _polygon_mask(inner, grid, scale)
    theirs &= people & ~mine
    for _ in range(2 * grid):
        grown_mine = _grow(mine, people) & ~theirs
        grown_theirs = _grow(theirs, people) & ~grown_mine
        if (grown_mine == mine).all() and (grown_theirs == theirs).all():
            break
        mine, theirs = grown_mine, grown_theirs
    for _ in range(2):  # a margin, so that the soft edge is not cut
        mine = _grow(mine, np.ones_like(mine)) & ~theirs
    keep = np.asarray(PIL.Image.fromarray(mine.astype(np.float32)).resize((size, size), PIL.Image.BILINEAR))
    return mask * np.clip(keep, 0.0, 1.0)


def _photo_and_face(image, frame: Optional[int], face) -> Tuple[PIL.Image.Image, FoundFace]:
    """The photo (or the video's frame `frame`) as RGB and its face; for a video the five points are averaged
    with the next six frames'."""
    if isinstance(image, str) and os.path.splitext(image)[1].lower() in VIDEO_EXTENSIONS:
        frames = read_video_frames(image, start=frame or 0, count=7)
        found = find_face(frames[0], face=face)
        found.points = smoothed_video_landmarks(frames, face=face)
        return frames[0], found
    if isinstance(image, str):
        photo = read_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be HxWx3 uint8, got {image.dtype} {image.shape}")
        photo = PIL.Image.fromarray(image)
    elif isinstance(image, PIL.Image.Image):
        photo = to_rgb(image)
    else:
        raise TypeError(f"image must be a path, a PIL image or an array, got {type(image).__name__}")
    return photo, find_face(photo, face=face)


def template_from_reference(reference: str, frame: Optional[int] = None, size: int = 128) -> IdentityTemplate:
    """A template measured on a real frame of the training data (an image, or a frame of a clip).

    The stable points of the reference face become the template; the background colour is the median colour
    of the frame's border (the training crops' plain green)."""
    photo, found = _photo_and_face(reference, frame, "largest")
    points = found.points
    pixels = np.asarray(photo)
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    colour = tuple(int(c) for c in np.median(border, axis=0))
    factor = size / max(photo.size)
    offset = ((size - photo.width * factor) / 2, (size - photo.height * factor) / 2)
    scaled = points * factor + offset
    return IdentityTemplate(
        points=[tuple(map(float, p)) for p in scaled],
        size=size,
        background=colour,
        source=f"measured on {os.path.basename(reference)}",
    )


def looks_prepared(image: PIL.Image.Image, background=GREEN_BACKGROUND, tolerance: float = 60.0) -> bool:
    """Whether an image already looks like a model-ready crop: square, with a border of the training green."""
    if abs(image.width - image.height) > 0.05 * max(image.size):
        return False
    pixels = np.asarray(image.convert("RGB"), np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(border - np.array(background, np.float32), axis=1)
    return bool((distance < tolerance).mean() > 0.6)


# --------------------------------------------------------------------------------------------------
# Video: one face followed through a clip

Box = Tuple[float, float, float, float]
SIMILAR_FACE = 0.6  # another face at least this share of the followed one's area makes a frame "crowded"


def detect_faces(rgb: np.ndarray) -> List[Box]:
    """Face boxes `(x0, y0, x1, y1)` in pixels of `rgb`, largest first (searched at most DETECTION_SIDE large)."""
    height, width = rgb.shape[:2]
    factor = min(1.0, DETECTION_SIDE / max(height, width))
    small = rgb
    if factor < 1.0:
        small = np.asarray(
            PIL.Image.fromarray(rgb).resize((max(1, round(width * factor)), max(1, round(height * factor))))
        )
    return [tuple(v / factor for v in box) for box in _boxes(FaceModels.shared(), np.ascontiguousarray(small))]


def box_corners(box) -> np.ndarray:
    """The four corners `(4, 2)` of a box `(x0, y0, x1, y1)`."""
    x0, y0, x1, y1 = box
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


def box_overlap(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


@dataclass
class FaceSegment:
    """Frames `[start, end)` of a clip in which one face is followed: its box per frame (None where it was not
    found, at most `max_gap` frames in a row) and how many frames show another face of similar size."""

    start: int
    end: int
    boxes: List[Optional[Box]]
    crowded: int = 0

    @property
    def found(self) -> int:
        return sum(b is not None for b in self.boxes)


def follow_face(
    boxes: Sequence[Sequence[Box]], cuts: Sequence[int] = (), max_gap: int = 5, min_overlap: float = 0.3
) -> List[FaceSegment]:
    """Follow one face through per-frame face boxes (largest first): a segment starts at the largest face,
    continues with the box that overlaps the last one most, and ends at a scene cut (a frame index in `cuts`)
    or when the face is missing for more than `max_gap` frames; the search then starts again after the last
    frame the face was seen in."""
    cuts = set(cuts)
    segments: List[FaceSegment] = []
    current: Optional[FaceSegment] = None
    last_box: Optional[Box] = None
    last_seen = -1
    index = 0

    def close():
        current.boxes = current.boxes[: last_seen - current.start + 1]
        current.end = last_seen + 1
        segments.append(current)

    while index < len(boxes):
        found = list(boxes[index])
        if current is None:
            if found:
                current = FaceSegment(index, index + 1, [found[0]])
                last_box, last_seen = found[0], index
                current.crowded += any(_area(b) >= SIMILAR_FACE * _area(found[0]) for b in found[1:])
            index += 1
            continue
        if index in cuts:
            close()
            current = None
            continue  # the frame after the cut starts the next segment
        best = max(found, key=lambda b: box_overlap(b, last_box), default=None)
        if best is not None and box_overlap(best, last_box) >= min_overlap:
            current.boxes.extend([None] * (index - last_seen - 1) + [best])
            current.crowded += any(b is not best and _area(b) >= SIMILAR_FACE * _area(best) for b in found)
            last_box, last_seen = best, index
        elif index - last_seen > max_gap:
            close()
            current = None
            index = last_seen + 1
            continue
        index += 1
    if current is not None:
        close()
    return segments


def fill_missing(points: np.ndarray) -> np.ndarray:
    """`(T, N, 2)` points with NaN rows for frames without landmarks, filled by linear interpolation in time
    (and the nearest frame's at the ends)."""
    points = np.array(points, np.float64)
    missing = np.isnan(points).any(axis=(1, 2))
    if missing.all():
        raise ValueError("no frame has landmarks")
    if missing.any():
        known = np.flatnonzero(~missing)
        flat = points.reshape(len(points), -1)
        for column in range(flat.shape[1]):
            flat[missing, column] = np.interp(np.flatnonzero(missing), known, flat[known, column])
        points = flat.reshape(points.shape)
    return points


def local_quadratic_smooth(values: np.ndarray, radius: int, times: Optional[np.ndarray] = None) -> np.ndarray:
    """Each row of `(T, K)` values replaced by the least-squares quadratic in time fitted over the frames up to
    `radius` away (a Savitzky-Golay filter where the frames are evenly spaced): noise is removed while a steady
    motion (up to a constant acceleration) passes unchanged and without lag. `times` (seconds, default evenly
    spaced) are when each frame was shown: a video resampled to another frame rate repeats or skips frames, and
    the fit follows the motion in the source's own time. Near the ends the window is one-sided."""
    values = np.asarray(values, np.float64)
    count = len(values)
    if radius <= 0 or count < 3:
        return values.copy()
    times = np.arange(count, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    smoothed = np.empty_like(values)
    for index in range(count):
        window = slice(max(0, index - radius), min(count, index + radius + 1))
        offsets = times[window] - times[index]
        degree = min(2, len(np.unique(offsets)) - 1)
        if degree < 1:
            smoothed[index] = values[window].mean(axis=0)
            continue
        scale = max(np.abs(offsets).max(), 1e-9)
        design = np.vander(offsets / scale, degree + 1, increasing=True)
        coefficients, *_ = np.linalg.lstsq(design, values[window], rcond=None)
        smoothed[index] = coefficients[0]  # the fitted value at this frame's own time
    return smoothed


def smooth_transforms(matrices: np.ndarray, radius: int, times: Optional[np.ndarray] = None) -> np.ndarray:
    """`(T, 2, 3)` similarity transforms smoothed over time: their four parameters (s cos, s sin, shift x and y)
    each go through `local_quadratic_smooth`, so the result is a similarity transform again."""
    matrices = np.asarray(matrices, np.float64)
    parameters = np.stack([matrices[:, 0, 0], matrices[:, 1, 0], matrices[:, 0, 2], matrices[:, 1, 2]], axis=1)
    a, b, tx, ty = local_quadratic_smooth(parameters, radius, times).T
    return np.stack([np.stack([a, -b, tx], 1), np.stack([b, a, ty], 1)], axis=1)


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def landmark_speed(points: np.ndarray) -> float:
    """The mean distance a landmark moves from one frame to the next, for `(T, N, 2)` points; frames without
    landmarks (NaN) are left out with the steps to and from them (NaN when no step is left)."""
    known = np.isfinite(points).all(axis=(1, 2))
    both = known[1:] & known[:-1]
    if not both.any():
        return float("nan")
    return float(np.linalg.norm(np.diff(points, axis=0)[both], axis=-1).mean())


def align_frame(
    rgb: np.ndarray,
    matrix: np.ndarray,
    size: int,
    background,
    keep_background: bool = False,
    face: Optional[FoundFace] = None,
    segmenter: str = "general",
) -> np.ndarray:
    """A video frame warped by `matrix` (frame pixels to `size` x `size` pixels), the person on `background`
    unless `keep_background` (with `face`, the face found in the frame: only that person), as `(size, size, 3)`
    uint8."""
    work = max(256, 2 * size)
    photo = PIL.Image.fromarray(rgb)
    aligned, _, _ = render_aligned(
        photo, np.asarray(matrix) * (work / size), work, background, keep_background, face, segmenter
    )
    return np.asarray(aligned.resize((size, size), PIL.Image.LANCZOS))


# --------------------------------------------------------------------------------------------------
# Command line


def resolve_template(model: Optional[str], reference: Optional[str]) -> Optional[IdentityTemplate]:
    """The template to prepare faces with: measured on `reference` when given, else the model folder's own (None
    when it has none)."""
    if reference:
        return template_from_reference(reference)
    return model_template(model)
