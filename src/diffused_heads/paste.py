"""The talking head back in the photo it came from (`generate --paste-back`).

A prepared identity frame is the photo warped by a similarity transform (photo pixels to crop pixels) with the
person put on the training green. Each generated frame goes back through the inverse of that transform into the
photo, at the photo's own size:

- Only the box of the photo that the crop covers is worked on; the rest of every frame is the photo itself.
- The blend weight is the generated frame's own person mask (the model draws the head on green, so how far a
  pixel is from that green says whether it is the head), pulled in by a pixel so the green fringe of the edge
  never shows, feathered, and faded out towards the crop's border so no square seam shows where the crop ends.
- Where the photo's person was but the generated head is not (the head moved or turned), the photo's background
  shows: the person is filled from the surrounding background once (a push-pull fill), so no ghost of the
  original head remains. Away from the generated person the fill covers the old person's soft edge too (a mask
  is never sure there); next to it the photo's own edge stays, so a head that did not move is the photo.
- The head's colour is matched to the photo's person along the seam (one offset per channel). The photo's person
  is known from the identity frame's person mask (`identity_mask`, which `paste_back_for` passes): without one
  there is no person to match and the colours are left as they are.

The generated face has the model's resolution (128 px for the released model): pasted into a photo where the head
is 400 px it is enlarged about three times (bicubic), and is softer than the photo around it. So that the outline
does not show as a step from sharp to soft, the photo's own fine detail (the photo less its blur at the
enlargement's scale) is added to the head in a band inside its outline, fading out inwards, and only where the
head's colours there agree with the photo's at that blur (where the head moved away, nothing is added, so no
ghost of the old outline). The face inside stays at the model's resolution: a model trained at a higher
resolution, or a face restorer run on the crop before pasting, would raise it.
"""

import logging
import math
from typing import Optional, Tuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .media import GREEN_BACKGROUND

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 1920
BORDER_FADE = 0.06  # of the crop's size: the blend fades to the photo over this much inside the crop's border
SHARPNESS_BAND = 0.15  # of the crop's size: the photo's detail fades out over this much inside the head's outline
DETAIL_TOLERANCE = 0.1  # colour difference (0-1) at which the photo's detail is mostly no longer added
MIN_ENLARGEMENT = 1.25  # photo pixels per generated pixel below which the head is as sharp as the photo


def green_distance_mask(
    frame: np.ndarray, background=GREEN_BACKGROUND, start: float = 0.12, end: float = 0.30
) -> np.ndarray:
    """`(H, W)` in [0, 1]: how surely each pixel of a frame `(H, W, 3)` in [0, 1] is not the background colour
    (0 within `start` of it in RGB distance, 1 beyond `end`)."""
    distance = np.linalg.norm(frame - np.asarray(background, np.float32) / 255.0, axis=-1)
    return np.clip((distance - start) / (end - start), 0.0, 1.0)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `(C, H, W)`, separable, edges replicated."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).to(image.dtype)
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return x[0]


def _erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """`(H, W)` mask eroded by `pixels` (a min filter)."""
    if pixels <= 0:
        return mask
    size = 2 * pixels + 1
    return -F.max_pool2d(-mask[None, None], size, stride=1, padding=pixels)[0, 0]


def fill_from_surroundings(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """`image` `(3, H, W)` with the pixels where `hole` `(H, W)` is True filled from the pixels around them (a
    push-pull fill: known pixels averaged down a pyramid, then brought back up into the hole)."""
    known = (~hole).float()[None]
    levels = [(image * known, known)]
    while min(levels[-1][0].shape[-2:]) > 2:
        values, weights = levels[-1]
        down = F.avg_pool2d(torch.cat([values, weights])[None], 2, ceil_mode=True)[0]
        levels.append((down[:-1], down[-1:]))
    filled = levels[-1][0] / levels[-1][1].clamp(min=1e-6)
    for values, weights in reversed(levels[:-1]):
        coarse = F.interpolate(filled[None], size=values.shape[-2:], mode="bilinear", align_corners=False)[0]
        own = values / weights.clamp(min=1e-6)
        sure = weights.clamp(0.0, 1.0)
        filled = own * sure + coarse * (1.0 - sure)
    return torch.where(hole[None], filled, image)


class PasteBack:
    """Puts generated frames back into the photo their identity frame was aligned from.

        paste = PasteBack(photo, matrix, crop_size=128)
        video_frame = paste(generated_frame)     # (H, W, 3) uint8 at the photo's size

    `matrix` (2x3) takes the photo's pixel coordinates to the identity frame's (`crop_size` pixels square);
    `identity_mask` `(crop_size, crop_size)` in [0, 1] is where the person is in the identity frame (default: read
    from the identity frame's distance to the green, when given as `identity`). Photos larger than `max_size` on
    their long side are scaled down to it; odd sizes lose their last row or column (H.264 needs even sizes)."""

    def __init__(
        self,
        photo: PIL.Image.Image,
        matrix: np.ndarray,
        crop_size: int,
        identity_mask: Optional[np.ndarray] = None,
        max_size: int = DEFAULT_MAX_SIZE,
        background=GREEN_BACKGROUND,
    ):
        if max_size < 16:
            raise ValueError(f"max_size must be at least 16, got {max_size}")
        photo = photo.convert("RGB")
        matrix = np.asarray(matrix, np.float64)
        self.scaled_from = None
        if max(photo.size) > max_size:
            factor = max_size / max(photo.size)
            self.scaled_from = photo.size
            new_size = (max(2, round(photo.width * factor)), max(2, round(photo.height * factor)))
            factor_x, factor_y = new_size[0] / photo.width, new_size[1] / photo.height
            photo = photo.resize(new_size, PIL.Image.LANCZOS)
            matrix = matrix @ np.diag([1 / factor_x, 1 / factor_y, 1.0])
        width, height = photo.width // 2 * 2, photo.height // 2 * 2
        if width < 2 or height < 2:
            raise ValueError(f"the photo is too small to paste into: {photo.width}x{photo.height}")
        photo = photo.crop((0, 0, width, height))
        self.size = (width, height)
        self.crop_size = crop_size
        self.matrix = matrix
        self.background = background
        self.photo = torch.from_numpy(np.asarray(photo, np.float32) / 255.0).permute(2, 0, 1)

        # The box of the photo the crop covers (its corners mapped back), and where each of its pixels lies in
        # the crop, in grid_sample's coordinates.
        inverse = np.linalg.inv(np.vstack([matrix, (0, 0, 1)]))[:2]
        corners = np.array([[0, 0], [crop_size, 0], [0, crop_size], [crop_size, crop_size]], np.float64)
        back = corners @ inverse[:, :2].T + inverse[:, 2]
        x0, y0 = np.floor(back.min(0)).astype(int) - 1
        x1, y1 = np.ceil(back.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            raise ValueError("the face's crop lies outside the photo")
        self.box = (int(x0), int(y0), int(x1), int(y1))
        xs, ys = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
        crop_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
        crop_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
        self.crop_xy = (crop_x, crop_y)
        # Fades to the photo over the last BORDER_FADE of the crop on each side (and is 0 outside the crop).
        edge = np.minimum(np.minimum(crop_x, crop_size - crop_x), np.minimum(crop_y, crop_size - crop_y))
        self.border = torch.from_numpy(np.clip(edge / (BORDER_FADE * crop_size), 0.0, 1.0).astype(np.float32))
        self.zoom = float(np.hypot(*matrix[:, 0]))  # crop pixels per photo pixel
        self.plate = None
        self.hole = torch.zeros(y1 - y0, x1 - x0)
        self._details = {}
        if identity_mask is not None:
            self.set_identity_mask(identity_mask)

    # --- where the photo's person was ---

    def set_identity_mask(self, identity_mask: np.ndarray) -> None:
        """Where the person is in the identity frame `(S, S)` in [0, 1]: in the photo, that part of the box is
        filled from its surroundings once, and shows wherever the generated head does not cover it."""
        mask = torch.from_numpy(np.asarray(identity_mask, np.float32))
        hole = self._to_box(mask[None])[0].clamp(0.0, 1.0) * self.border
        x0, y0, x1, y1 = self.box
        region = self.photo[:, y0:y1, x0:x1]
        # The fill takes nothing from the person's soft edge (a little more than the person is left out of it).
        filled = F.max_pool2d(hole[None, None], 5, stride=1, padding=2)[0, 0] > 0.02
        self.plate = fill_from_surroundings(region, filled)
        self.hole = hole
        # Where the plate may stand in for the photo: all of the filled part (the person's soft edge, where a mask
        # is never sure, included: else a faint outline of the old head stays where the head left), feathered by
        # a pixel, and faded out towards the crop's border as the rest of the blend is.
        self.cover = _blur(filled.float()[None], 1.0)[0].clamp(0.0, 1.0) * self.border

    # --- pasting ---

    def _to_box(self, image: torch.Tensor) -> torch.Tensor:
        """`(C, s, s)` crop-space values, at any size `s`, resampled at the box's pixels (bicubic; the border's
        values outside the crop). The crop's coordinates are normalised (`grid_sample`'s [-1, 1]), so the frame's
        own size does not enter."""
        crop_x, crop_y = self.crop_xy
        grid = np.stack([2 * crop_x / self.crop_size - 1, 2 * crop_y / self.crop_size - 1], axis=-1)
        grid = torch.from_numpy(grid.astype(np.float32))[None]
        return F.grid_sample(image[None], grid, mode="bicubic", padding_mode="border", align_corners=False)[0]

    def enlargement(self, size: int) -> float:
        """Photo pixels per pixel of a generated frame of `size` pixels."""
        return self.crop_size / (size * self.zoom)

    def photo_detail(self, size: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The box of the photo blurred to the resolution of an enlarged generated frame of `size` pixels, and the
        detail that blur takes away; None where frames of that size are not enlarged (computed once per size)."""
        if size not in self._details:
            enlargement = self.enlargement(size)
            detail = None
            if enlargement >= MIN_ENLARGEMENT:
                x0, y0, x1, y1 = self.box
                region = self.photo[:, y0:y1, x0:x1]
                low = _blur(region, 0.5 * enlargement)
                detail = (low, region - low)
            self._details[size] = detail
        return self._details[size]

    def head_and_weight(self, frame: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """A generated frame `(s, s, 3)` in [0, 1] resampled into the box, and its blend weight there."""
        head, weight, _, _ = self._head_weight_band(frame)
        return head, weight

    def _head_weight_band(self, frame: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`head_and_weight`; the band inside the head's outline where the photo's detail is added (1 at the
        outline, 0 from SHARPNESS_BAND of the crop inwards); and how near the generated person is (its mask, not
        pulled in, grown by a few pixels)."""
        frame = np.asarray(frame, np.float32)
        size = frame.shape[0]
        mask = torch.from_numpy(green_distance_mask(frame, self.background))
        reach = max(2, round(3 * size / 128))
        person_near = F.max_pool2d(mask[None, None], 2 * reach + 1, stride=1, padding=reach)[0, 0]
        # Near the head's outline the green the model drew behind it tints the head: there green is kept no higher
        # than the larger of red and blue (a despill), and the outline's half-green pixels are left out.
        greenish = torch.from_numpy(green_distance_mask(frame, self.background, start=0.3, end=0.6)) < 1.0
        near = F.max_pool2d(greenish.float()[None, None], 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0
        pixels = torch.tensor(frame).permute(2, 0, 1)  # a copy: the frame may be a read-only array
        spill_free = torch.minimum(pixels[1], torch.maximum(pixels[0], pixels[2]))
        pixels = torch.stack([pixels[0], torch.where(near, spill_free, pixels[1]), pixels[2]])
        mask = _erode(mask, max(1, round(2 * size / 128)))
        mask = _blur(mask[None], 0.6 * size / 128)[0]
        head = self._to_box(pixels).clamp(0.0, 1.0)
        band = mask * (2.0 * (1.0 - _blur(mask[None], 0.5 * SHARPNESS_BAND * size)[0])).clamp(0.0, 1.0)
        weight, band, person_near = self._to_box(torch.stack([mask, band, person_near])).clamp(0.0, 1.0)
        return head, weight * self.border, band, person_near

    def __call__(self, frame) -> np.ndarray:
        """One generated frame (`(s, s, 3)` float in [0, 1] or uint8) pasted into the photo: `(H, W, 3)` uint8."""
        frame = np.asarray(frame)
        if frame.dtype == np.uint8:
            frame = frame.astype(np.float32) / 255.0
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.shape[0] != frame.shape[1]:
            raise ValueError(f"a generated frame is (size, size, 3), got {frame.shape}")
        head, weight, band, person_near = self._head_weight_band(frame)
        x0, y0, x1, y1 = self.box
        photo = self.photo[:, y0:y1, x0:x1]
        base = photo
        if self.plate is not None:
            # The photo's person shows where the generated one is (its edge is the photo's own there); where the
            # generated person is not near, all of the old one is gone, its soft edge too.
            cover = torch.maximum(self.hole, self.cover * (1.0 - person_near))
            base = photo * (1 - cover) + self.plate * cover
        # One colour offset per channel, measured where the head and the photo's person overlap near the seam.
        if self.plate is not None:  # (without the photo's person mask there is nothing to match: see the docstring)
            seam = (weight > 0.2) & (weight < 0.98) & (self.hole > 0.5)
        if self.plate is not None and int(seam.sum()) > 20:
            offset = (photo[:, seam] - head[:, seam]).mean(dim=1).clamp(-0.1, 0.1)
            head = (head + offset[:, None, None]).clamp(0.0, 1.0)
        detail = self.photo_detail(frame.shape[0])
        if detail is not None:  # the photo's sharpness carried a little way into the head (see the docstring)
            low, fine = detail
            agree = torch.exp(-(((head - low).abs().mean(dim=0) / DETAIL_TOLERANCE) ** 2))
            head = (head + fine * (band * agree)[None]).clamp(0.0, 1.0)
        out = self.photo.clone()
        out[:, y0:y1, x0:x1] = base * (1 - weight) + head * weight
        return (out.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def paste_back_for(identity: PIL.Image.Image, aligned, photo: PIL.Image.Image, max_size: int = DEFAULT_MAX_SIZE):
    """What `--paste-back` does with an identity frame made by `runtime.identity_frame(..., with_alignment=True)`:
    `(paste, size)`, a `PasteBack` into the photo the frame was aligned from (and no scaling of its frames); for an
    image that was already a model-ready crop (`aligned` None), no pasting and the crop's own size (even-rounded)."""
    if aligned is None:
        return None, max(16, min(identity.width, max_size) // 2 * 2)
    paste = PasteBack(photo, aligned.matrix, identity.width, identity_mask=aligned.mask, max_size=max_size)
    if paste.scaled_from is not None:
        logger.info(
            f"the photo is {paste.scaled_from[0]}x{paste.scaled_from[1]}; the video is scaled to "
            f"{paste.size[0]}x{paste.size[1]} (--max-size {max_size})"
        )
    return paste, None
