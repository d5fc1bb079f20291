"""Measures of talking-face clips that work offline, from the face mesh of the faces extra and from the pixels.

All take frames as `(F, S, S, 3)` uint8 (or float in [0, 1]) at 25 fps and speech at 16 kHz with 640 samples
per frame; landmarks are the face mesh's `(F, 468, 2)` points in pixels, NaN where no face was found.

- **Lip sync**: `mouth_opening` (the inner lips' gap over the mouth's width), its Pearson correlation with the
  speech loudness (`loudness`, dB per frame), and the audio-video offset that maximises it (`sync_offset`:
  positive when the mouth moves after the sound); `mouth_landmark_distance` (LMD) between two clips: the mean
  distance of corresponding lip points, each frame's lips centred on their mean (head position removed), in
  pixels of the frame.
- **Identity and quality**: `psnr` and `ssim` (Wang et al. 2004: an 11-tap Gaussian window of sigma 1.5 on the
  luma, constants 0.01 and 0.03), over the whole frame or outside the mouth (`mouth_masks`).
- **Motion**: `eye_aspect_ratio` per frame, `blinks` (blinks per second and their mean length) and
  `head_jitter` (frame-to-frame speed of the five stable points).
"""

import math
from typing import Dict, Optional, Tuple

import numpy as np

from .faces import (
    INNER_LIPS,
    LEFT_EYE,
    MESH_INDICES,
    OUTER_LIPS,
    RIGHT_EYE,
    FaceModels,
    face_mesh,
    landmark_speed,
)
from .media import FPS, SAMPLES_PER_FRAME
from .synthetic_data import MOUTH_INSIDE

LIPS = tuple(dict.fromkeys(OUTER_LIPS + INNER_LIPS))
# Inner-lip points facing each other across the mouth (upper, lower), and the mouth corners.
LIP_PAIRS = ((13, 14), (82, 87), (312, 317), (81, 178), (311, 402))
MOUTH_CORNERS = (61, 291)
BLINK_SHARE = 0.75  # a frame whose eye aspect ratio is below this share of the clip's open-eye value is shut


def clip_landmarks(frames: np.ndarray) -> np.ndarray:
    """The face mesh of every frame of an aligned clip, `(F, 468, 2)` pixels, NaN where no face was found."""
    models = FaceModels.shared()
    frames = _as_uint8(frames)
    size = frames.shape[1]
    found = np.full((len(frames), 468, 2), np.nan)
    for index, frame in enumerate(frames):
        points = face_mesh(models, np.ascontiguousarray(frame), (0, 0, frame.shape[1], size))
        if points is not None:
            found[index] = points
    return found


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _as_unit(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    return frames.astype(np.float64) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Lip sync


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """Per frame: the mean gap between facing inner-lip points over the width between the mouth corners."""
    gaps = np.mean([np.linalg.norm(points[:, a] - points[:, b], axis=-1) for a, b in LIP_PAIRS], axis=0)
    width = np.linalg.norm(points[:, MOUTH_CORNERS[0]] - points[:, MOUTH_CORNERS[1]], axis=-1)
    return gaps / np.maximum(width, 1e-9)


def loudness(waveform: np.ndarray, num_frames: Optional[int] = None) -> np.ndarray:
    """Speech loudness per video frame: the RMS of each frame's 640 samples, in dB (floored at -80 dB)."""
    waveform = np.asarray(waveform, np.float64)
    count = len(waveform) // SAMPLES_PER_FRAME if num_frames is None else num_frames
    padded = np.zeros(count * SAMPLES_PER_FRAME)
    usable = min(len(waveform), len(padded))
    padded[:usable] = waveform[:usable]
    rms = np.sqrt(np.mean(padded.reshape(count, SAMPLES_PER_FRAME) ** 2, axis=1))
    return 20.0 * np.log10(np.maximum(rms, 1e-4))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the frames where both are known; 0 where either does not vary."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    known = np.isfinite(a) & np.isfinite(b)
    a, b = a[known], b[known]
    if len(a) < 3 or a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def shifted_correlation(opening: np.ndarray, sound: np.ndarray, offset: int) -> float:
    """The correlation of the mouth opening with the loudness `offset` frames earlier (the mouth late by
    `offset` frames when positive)."""
    if offset >= 0:
        return pearson(opening[offset:], sound[: len(sound) - offset])
    return pearson(opening[: len(opening) + offset], sound[-offset:])


def sync_offset(opening: np.ndarray, sound: np.ndarray, max_offset: int = 5) -> Tuple[int, float]:
    """The offset in frames (within ±`max_offset`) at which the mouth opening follows the loudness best, and
    the correlation there."""
    best = max(range(-max_offset, max_offset + 1), key=lambda k: (shifted_correlation(opening, sound, k), -abs(k)))
    return best, shifted_correlation(opening, sound, best)


def mouth_landmark_distance(points: np.ndarray, reference: np.ndarray) -> float:
    """LMD: the mean distance between corresponding lip points of two clips, frame by frame, each frame's lips
    centred on their own mean, in pixels (frames where either clip has no face are skipped)."""
    count = min(len(points), len(reference))
    a, b = points[:count, list(LIPS)], reference[:count, list(LIPS)]
    distance = np.linalg.norm((a - a.mean(axis=1, keepdims=True)) - (b - b.mean(axis=1, keepdims=True)), axis=-1)
    known = np.isfinite(distance)
    return float(distance[known].mean()) if known.any() else float("nan")


# --------------------------------------------------------------------------------------------------
# Identity and quality


def mouth_masks(points: np.ndarray, size: int, margin: float = 0.06) -> np.ndarray:
    """`(F, size, size)` bool: the box around each frame's lips, widened by `margin` of the size on every side
    (a frame without landmarks gets the clip's mean box)."""
    lips = points[:, list(LIPS)]
    missing = ~np.isfinite(lips).all(axis=(1, 2))
    if missing.all():
        return np.zeros((len(points), size, size), bool)
    low, high = np.zeros((len(points), 2)), np.zeros((len(points), 2))
    low[~missing], high[~missing] = lips[~missing].min(axis=1), lips[~missing].max(axis=1)
    low[missing], high[missing] = low[~missing].mean(axis=0), high[~missing].mean(axis=0)
    low, high = low - margin * size, high + margin * size
    grid = np.arange(size) + 0.5
    inside_x = (grid[None] >= low[:, :1]) & (grid[None] <= high[:, :1])
    inside_y = (grid[None] >= low[:, 1:]) & (grid[None] <= high[:, 1:])
    return inside_y[:, :, None] & inside_x[:, None, :]


def psnr(frames: np.ndarray, reference: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB of frames against reference frames (one frame or one per frame), over the pixels where
    `mask` (`(F, H, W)`, or `(H, W)` for every frame) is True (all by default); 100 dB for identical frames."""
    a, b = _as_unit(frames), _as_unit(reference)
    b = np.broadcast_to(b, a.shape)
    squared = ((a - b) ** 2).mean(axis=-1)
    mse = squared[np.broadcast_to(mask, squared.shape)].mean() if mask is not None else squared.mean()
    return 100.0 if mse <= 1e-10 else float(10.0 * np.log10(1.0 / mse))


def _gaussian_taps(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def _filter(images: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filtering of `(F, H, W)` along H and W, keeping the valid part."""
    rows = np.apply_along_axis(lambda v: np.convolve(v, taps, mode="valid"), 1, images)
    return np.apply_along_axis(lambda v: np.convolve(v, taps, mode="valid"), 2, rows)


def ssim_maps(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM `(F, H - 10, W - 10)` of the luma of frames against reference frames."""
    weights = np.array([0.299, 0.587, 0.114])
    a = _as_unit(frames) @ weights
    b = np.broadcast_to(_as_unit(reference) @ weights, a.shape)
    taps = _gaussian_taps()
    mean_a, mean_b = _filter(a, taps), _filter(b, taps)
    var_a = _filter(a * a, taps) - mean_a**2
    var_b = _filter(b * b, taps) - mean_b**2
    covariance = _filter(a * b, taps) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))


def ssim(frames: np.ndarray, reference: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Mean SSIM over the frames (and where `mask` `(F, H, W)` is True: windows centred there)."""
    maps = ssim_maps(frames, reference)
    if mask is None:
        return float(maps.mean())
    return float(maps[mask[:, 5:-5, 5:-5]].mean())


# --------------------------------------------------------------------------------------------------
# Motion


def eye_aspect_ratio(points: np.ndarray) -> np.ndarray:
    """Per frame: the eye aspect ratio (Soukupova and Cech 2016) averaged over both eyes."""

    def one(eye):
        p = points[:, list(eye)]
        vertical = np.linalg.norm(p[:, 1] - p[:, 5], axis=-1) + np.linalg.norm(p[:, 2] - p[:, 4], axis=-1)
        return vertical / np.maximum(2.0 * np.linalg.norm(p[:, 0] - p[:, 3], axis=-1), 1e-9)

    return (one(RIGHT_EYE) + one(LEFT_EYE)) / 2.0


def blinks(ratio: np.ndarray, fps: float = FPS) -> Tuple[float, float]:
    """Blinks per second and their mean length in seconds, from per-frame eye aspect ratios: a blink is a run
    of frames below `BLINK_SHARE` of the clip's open-eye value (its 90th percentile)."""
    ratio = np.asarray(ratio, np.float64)
    known = ratio[np.isfinite(ratio)]
    if len(known) < 2:
        return 0.0, 0.0
    shut = np.nan_to_num(ratio, nan=np.inf) < BLINK_SHARE * np.percentile(known, 90)
    runs, length = [], 0
    for closed in shut:
        if closed:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    if length:
        runs.append(length)
    seconds = len(ratio) / fps
    return len(runs) / seconds, (float(np.mean(runs)) / fps if runs else 0.0)


def head_jitter(points: np.ndarray) -> float:
    """Head motion: the mean frame-to-frame distance of the five stable points, in pixels."""
    return landmark_speed(points[:, list(MESH_INDICES)])


# --------------------------------------------------------------------------------------------------
# A clip


def clip_measures(frames: np.ndarray, points: np.ndarray, waveform: np.ndarray, max_offset: int = 5) -> Dict:
    """The measures of one clip on its own: sync with its speech, blinks, head motion."""
    opening = mouth_opening(points)
    sound = loudness(waveform, len(frames))
    offset, best = sync_offset(opening, sound, max_offset)
    rate, length = blinks(eye_aspect_ratio(points))
    return {
        "sync_r": shifted_correlation(opening, sound, 0),
        "sync_offset": offset,
        "sync_r_best": best,
        "blinks_per_s": rate,
        "blink_s": length,
        "head_jitter_px": head_jitter(points),
        "face_found": float(np.isfinite(points).all(axis=(1, 2)).mean()),
    }


def compared_measures(frames: np.ndarray, points: np.ndarray, reference: np.ndarray, reference_points) -> Dict:
    """The measures of a clip against its ground truth: LMD, and PSNR and SSIM over the frame and outside the
    mouth (the ground truth's mouth box)."""
    count = min(len(frames), len(reference))
    frames, reference = frames[:count], reference[:count]
    points, reference_points = points[:count], reference_points[:count]
    outside = ~mouth_masks(reference_points, reference.shape[1])
    return {
        "lmd_px": mouth_landmark_distance(points, reference_points),
        "psnr": psnr(frames, reference),
        "psnr_outside_mouth": psnr(frames, reference, outside),
        "ssim": ssim(frames, reference),
        "ssim_outside_mouth": ssim(frames, reference, outside),
    }


# Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom (beyond: the normal's 1.96).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Drawn faces (synthetic clips): measured by colour, without the face mesh


def drawn_mouth_region(boxes, source_size: float, size: int) -> Tuple[int, int, int, int]:
    """The union of mouth `boxes` (`[x0, y0, x1, y1]` in pixels of a `source_size` frame; one box or one per
    frame), widened by 6% of the size on every side, in pixels of a `size` frame."""
    boxes = np.atleast_2d(np.asarray(boxes, np.float64)) * size / source_size
    margin = 0.06 * size
    return (
        int(max(0, np.floor(boxes[:, 0].min() - margin))),
        int(max(0, np.floor(boxes[:, 1].min() - margin))),
        int(min(size, np.ceil(boxes[:, 2].max() + margin))),
        int(min(size, np.ceil(boxes[:, 3].max() + margin))),
    )


def outside_region(size: int, region) -> np.ndarray:
    """`(size, size)` bool: True outside the `(x0, y0, x1, y1)` region (for `psnr` outside a drawn mouth)."""
    mask = np.ones((size, size), bool)
    x0, y0, x1, y1 = region
    mask[y0:y1, x0:x1] = False
    return mask


def drawn_mouth_opening(frames: np.ndarray, region) -> np.ndarray:
    """Per-frame mouth opening of drawn `(F, H, W, 3)` frames (uint8 or [0, 1]): the mean, over the region, of how
    close each pixel is to the colour of the inside of the drawn mouth (1 at that colour, 0 beyond a distance of
    0.3)."""
    x0, y0, x1, y1 = region
    crop = _as_unit(frames)[:, y0:y1, x0:x1]
    distance = np.linalg.norm(crop - np.array(MOUTH_INSIDE) / 255.0, axis=-1)
    return np.clip(1.0 - distance / 0.3, 0.0, 1.0).mean(axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Summaries


def mean_and_interval(values) -> Tuple[float, float]:
    """The mean of the finite values and the half-width of its 95% confidence interval (Student's t)."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float("nan")
    quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return float(values.mean()), float(quantile * values.std(ddof=1) / math.sqrt(len(values)))
