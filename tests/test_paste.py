"""`--paste-back`: generated frames back in the photo, checked against known answers on real photos."""

import os

import numpy as np
import PIL.Image
import pytest

from diffused_heads import generate
from diffused_heads.media import GREEN_BACKGROUND, VideoWriter, read_video_frames
from diffused_heads.paste import PasteBack

from helpers import speech_like
from talking_videos import astronaut, hopper

pytest.importorskip("mediapipe", reason="the faces extra is not installed")
from diffused_heads.faces import align_identity  # noqa: E402


def placed(photo, case):
    """The photo turned, scaled or moved on a larger canvas."""
    if case == "turned":
        return photo.rotate(17, expand=True, resample=PIL.Image.BICUBIC, fillcolor=(90, 120, 160))
    if case == "scaled":
        return photo.resize((photo.width * 3 // 2, photo.height * 3 // 2), PIL.Image.LANCZOS)
    if case == "moved":
        canvas = PIL.Image.new("RGB", (photo.width + 300, photo.height + 120), (90, 120, 160))
        canvas.paste(photo, (260, 30))
        return canvas
    return photo


def as_unit(image):
    """An image (PIL, uint8 or already float in [0, 1]) as float32 in [0, 1]."""
    array = np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def psnr(a, b, where):
    mse = float(((as_unit(a) - as_unit(b)) ** 2)[where].mean())
    return 100.0 if mse <= 1e-10 else 10 * np.log10(1 / mse)


def weight_in_photo(paste, frame):
    """The blend weight of a generated frame over the whole (even-cropped) photo."""
    _, weight = paste.head_and_weight(as_unit(frame))
    x0, y0, x1, y1 = paste.box
    full = np.zeros(paste.size[::-1], np.float32)
    full[y0:y1, x0:x1] = weight.numpy()
    return full


def grown(mask, pixels):
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=pixels)


# The crop is made at a size where it holds about as many pixels as the photo's head (so the resolution it loses
# is not what is measured): 256 for Grace Hopper's large head, 128 for the astronaut's.
PHOTOS = {"hopper": (hopper, 256), "astronaut": (astronaut, 128)}


@pytest.mark.parametrize("case", ["as taken", "turned", "scaled", "moved"])
@pytest.mark.parametrize("name", ["hopper", "astronaut"])
def test_pasting_back_the_identity_frame_gives_the_photo(name, case):
    make, size = PHOTOS[name]
    photo = placed(make(), case)
    if case == "scaled":
        size = size * 3 // 2
    aligned = align_identity(photo, size=size)
    paste = PasteBack(photo, aligned.matrix, size, identity_mask=aligned.mask)
    out = paste(as_unit(aligned.image))
    reference = photo.crop((0, 0, *paste.size))
    assert out.shape == (paste.size[1], paste.size[0], 3)
    weight = weight_in_photo(paste, aligned.image)
    head = weight > 0.99
    seam = grown((weight > 0.01) & ~head, 3)
    assert head.sum() > 5000
    assert psnr(out, reference, ~seam & ~head) >= 40.0
    assert psnr(out, reference, head & ~seam) >= 30.0


@pytest.mark.parametrize("case", ["as taken", "turned"])
def test_a_head_moved_in_the_crop_moves_by_that_over_the_crops_scale_in_the_photo(case):
    photo = placed(hopper(), case)
    aligned = align_identity(photo, size=128)
    paste = PasteBack(photo, aligned.matrix, 128, identity_mask=aligned.mask)
    frame = as_unit(aligned.image)
    d = 6

    def centre(weight):
        ys, xs = np.nonzero(weight > 0.5)
        return np.array([xs.mean(), ys.mean()])

    # Only the middle of the crop, away from its border fade, so the measured head is the same head; moved d
    # pixels to the right (what rolls in from the other side is green).
    green = np.asarray(GREEN_BACKGROUND, np.float32) / 255.0
    core = np.zeros(frame.shape[:2], bool)
    core[20:108, 26:96] = True
    frame_core = np.where(core[..., None], frame, green)
    moved_core = np.roll(frame_core, d, axis=1)
    shift = centre(weight_in_photo(paste, moved_core)) - centre(weight_in_photo(paste, frame_core))
    inverse = np.linalg.inv(aligned.matrix[:, :2])
    expected = inverse @ np.array([d, 0.0])  # d crop pixels, over the crop's scale, turned as the photo is
    assert np.linalg.norm(expected) > 10
    np.testing.assert_allclose(shift, expected, atol=1.0)


def high_frequency(image):
    """Each pixel's distance from its own Gaussian blur (sigma 1), averaged over the channels."""
    from scipy.ndimage import gaussian_filter

    unit = as_unit(image)
    return np.abs(unit - gaussian_filter(unit, (1, 1, 0))).mean(-1)


def seam_sides(weight, pixels=8):
    """The head's side and the photo's side of its outline, `pixels` wide each."""
    head, outside = weight > 0.99, weight < 0.01
    return head & grown(~head, pixels), outside & grown(~outside, pixels)


def test_the_seam_is_no_step_from_sharp_to_soft():
    """A 64-px head in a photo where it is 5 times larger: how much sharper the photo is just outside the outline
    than the head just inside (measured against the same ratio in the photo itself) is what shows as a seam."""
    photo = hopper()
    aligned = align_identity(photo, size=128)
    paste = PasteBack(photo, aligned.matrix, 128, identity_mask=aligned.mask)
    frame = as_unit(aligned.image.resize((64, 64), PIL.Image.LANCZOS))
    assert paste.enlargement(64) > 4
    out = paste(frame)
    reference = photo.crop((0, 0, *paste.size))
    weight = weight_in_photo(paste, frame)
    inside, outside = seam_sides(weight)
    step = [high_frequency(image)[inside].mean() / high_frequency(image)[outside].mean() for image in (out, reference)]
    assert step[0] / step[1] >= 0.6  # 0.28 with the head's own resolution up to its outline
    # The face itself (away from the outline) keeps its own resolution.
    deep = (weight > 0.99) & ~grown(weight < 0.99, 40)
    assert high_frequency(out)[deep].mean() < 0.5 * high_frequency(reference)[deep].mean()


def test_the_photos_detail_is_not_added_where_the_head_moved_away(monkeypatch):
    """Where the generated head differs from the photo (it moved), the photo's detail would draw a ghost of the
    old outline: there the result is what it is with no detail added at all."""
    import diffused_heads.paste as paste_module

    photo = hopper()
    aligned = align_identity(photo, size=128)
    frame = np.roll(as_unit(aligned.image.resize((64, 64), PIL.Image.LANCZOS)), 4, axis=1)
    paste = PasteBack(photo, aligned.matrix, 128, identity_mask=aligned.mask)
    with_detail = as_unit(paste(frame))
    monkeypatch.setattr(paste_module, "MIN_ENLARGEMENT", float("inf"))
    without = as_unit(PasteBack(photo, aligned.matrix, 128, identity_mask=aligned.mask)(frame))
    head, _ = paste.head_and_weight(frame)
    low, _ = paste.photo_detail(64)
    x0, y0, x1, y1 = paste.box
    added = np.abs(with_detail - without)[y0:y1, x0:x1].max(-1)
    differs = (head - low).abs().mean(0).numpy() > 0.35
    assert differs.sum() > 500 and added.max() > 0.05  # the band gets detail where the head agrees
    assert added[differs].max() < 2 / 255


def test_in_a_group_photo_the_chosen_face_talks_and_the_others_are_unchanged(tmp_path):
    """`generate --paste-back --face 1` on a photo of two people animates the second-largest face; the other
    person, who stands a few pixels from the box the paste writes in, is unchanged right next to it."""
    import soundfile

    group = PIL.Image.new("RGB", (1000, 620), (200, 200, 200))
    group.paste(astronaut().resize((400, 400)), (0, 100))
    group.paste(hopper(), (245, 10))  # the larger face, beside the astronaut's
    group.save(tmp_path / "group.png")
    aligned = align_identity(group, face=1)
    x0, _, x1, _ = PasteBack(group, aligned.matrix, aligned.image.width, identity_mask=aligned.mask).box
    assert x0 < 150 and 235 <= x1 <= 245  # the paste writes up to Grace Hopper's edge, not over it
    soundfile.write(tmp_path / "s.wav", speech_like(0.2), 16000)
    out = tmp_path / "out.mp4"
    args = ["--image", tmp_path / "group.png", "--audio", tmp_path / "s.wav", "--steps", "1", "--paste-back"]
    assert generate.main([str(a) for a in [*args, "--face", "1", "--output", out]]) == 0
    frames = read_video_frames(str(out), 0, None)
    assert frames[0].size == group.size
    # The photo itself through the same encoder: what the codec alone changes.
    with VideoWriter(str(tmp_path / "photo.mp4"), np.zeros(640 * len(frames), np.float32), size=None) as writer:
        for _ in frames:
            writer.write(np.asarray(group))
    encoded = read_video_frames(str(tmp_path / "photo.mp4"), 0, None)
    for frame, photo in zip(frames, encoded):
        changed = np.abs(as_unit(frame) - as_unit(photo)).max(-1) > 0.1
        assert changed[:, x0:x1].sum() > 500  # the astronaut talks
        assert changed[:, 245:].sum() <= 5  # Grace Hopper does not, right beside the pasted head


def green_excess(image):
    """How much greener than red and blue each pixel is."""
    unit = as_unit(image)
    return unit[..., 1] - np.maximum(unit[..., 0], unit[..., 2])


def new_green(out, photo):
    """Pixels of the output with a green cast where the photo had none."""
    return int(((green_excess(out) > 0.1) & (green_excess(photo) < 0.05)).sum())


def test_no_green_shows_the_other_person_is_unchanged_and_the_old_head_is_gone():
    """A head moved off its place (so the photo's own head is uncovered) on a group photo: no pixel of the
    model's green, nothing of the second person changed, and where the head was the background shows."""
    group = PIL.Image.new("RGB", (1000, 620), (200, 200, 200))
    group.paste(astronaut().resize((400, 400)), (0, 100))
    group.paste(hopper(), (470, 10))
    aligned = align_identity(group, size=128)  # the larger face: Grace Hopper's
    paste = PasteBack(group, aligned.matrix, 128, identity_mask=aligned.mask)
    frame = as_unit(aligned.image)
    moved = np.roll(frame, 10, axis=1)
    moved[:, :10] = np.asarray(GREEN_BACKGROUND, np.float32) / 255.0
    # A model draws the head's edge soft, half green: the identity frame blurred is such a frame.
    from scipy.ndimage import gaussian_filter

    soft = gaussian_filter(frame, sigma=(1.5, 1.5, 0))
    for generated in (frame, moved, soft):
        out = paste(generated)
        assert new_green(out, group) <= 50
        np.testing.assert_array_equal(out[:, :420], np.asarray(group)[:, :420])  # the astronaut's side
    # Where the photo's head was and the moved one is not, the background shows, not the old head.
    x0, y0, x1, y1 = paste.box
    uncovered = (paste.hole.numpy() > 0.9) & (weight_in_photo(paste, moved)[y0:y1, x0:x1] < 0.05)
    assert uncovered.sum() > 200
    out = paste(moved)[y0:y1, x0:x1]
    assert np.abs(as_unit(out) - as_unit(group)[y0:y1, x0:x1])[uncovered].mean() > 0.1


def test_where_the_head_left_its_place_no_outline_of_it_remains():
    """A red disc (the person, with a soft 3-px edge) on a flat grey photo, its mask as a segmenter gives it (soft
    at the edge, and a pixel short of the person's outermost pixels), and a generated frame without the head: the
    whole photo must come out grey, the disc's edge included."""
    size, crop = 240, 96
    ys, xs = np.mgrid[:size, :size] + 0.5
    radius = np.hypot(xs - 120, ys - 120)
    person = np.clip((50 - radius) / 3 + 0.5, 0, 1)[..., None]  # 1 inside, 0 beyond 51.5 px
    grey, red = np.array([0.5, 0.5, 0.5]), np.array([0.85, 0.2, 0.2])
    photo = PIL.Image.fromarray(((grey * (1 - person) + red * person) * 255 + 0.5).astype(np.uint8))
    scale = crop / 160  # the crop covers the photo's middle 160 px
    matrix = np.array([[scale, 0, -40 * scale], [0, scale, -40 * scale]])
    cys, cxs = (np.mgrid[:crop, :crop] + 0.5) / scale + 40
    mask = np.clip((49 - np.hypot(cxs - 120, cys - 120)) / 2 + 0.5, 0, 1)
    paste = PasteBack(photo, matrix, crop, identity_mask=mask)
    no_head = np.broadcast_to(np.asarray(GREEN_BACKGROUND, np.float32) / 255.0, (crop, crop, 3))
    out = as_unit(paste(no_head))
    assert np.abs(out - grey).max() < 0.04


def test_an_exif_turned_photo_comes_out_upright_and_at_its_size(tmp_path):
    upright = hopper()
    stored = upright.rotate(90, expand=True)  # stored on its side; the EXIF tag says to turn it back
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    stored.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    import soundfile

    soundfile.write(tmp_path / "s.wav", speech_like(0.2), 16000)
    out = tmp_path / "o.mp4"
    args = ["--image", tmp_path / "turned.jpg", "--audio", tmp_path / "s.wav", "--paste-back", "--steps", "1"]
    assert generate.main([str(a) for a in args + ["--output", out]]) == 0
    first = read_video_frames(str(out), 0)[0]
    assert first.size == (upright.width // 2 * 2, upright.height // 2 * 2)
    # Away from the head the video is the photo, upright (within the video codec's error).
    top_left = (slice(0, 60), slice(0, 60))
    assert np.abs(as_unit(first)[top_left] - as_unit(upright)[top_left]).mean() < 0.03


def test_bad_input_and_sizes(tmp_path, capsys):
    import soundfile

    from diffused_heads import example_image_path

    soundfile.write(tmp_path / "s.wav", speech_like(0.2), 16000)
    hopper().save(tmp_path / "photo.jpg")
    common = ["--audio", tmp_path / "s.wav", "--steps", "1", "--paste-back"]

    def run(*extra):
        return generate.main([str(a) for a in [*common, *extra]])

    assert run("--image", tmp_path / "photo.jpg", "--no-prepare", "--output", tmp_path / "a.mp4") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--no-prepare" in err[0]
    assert not (tmp_path / "a.mp4").exists()

    # Larger than the cap: scaled, with a note.
    assert run("--image", tmp_path / "photo.jpg", "--max-size", "300", "--output", tmp_path / "b.mp4") == 0
    assert "scaled to 256x300" in capsys.readouterr().err
    assert read_video_frames(str(tmp_path / "b.mp4"), 0)[0].size == (256, 300)

    # Already a model-ready crop: the crop's own size.
    assert run("--image", example_image_path(), "--output", tmp_path / "c.mp4") == 0
    crop = PIL.Image.open(example_image_path())
    assert read_video_frames(str(tmp_path / "c.mp4"), 0)[0].size == (crop.width // 2 * 2,) * 2
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".partial")]


# --------------------------------------------------------------------------------------------------
# Known answers


def turned(angle_degrees, scale, shift=(0.0, 0.0)):
    """The 2x3 matrix that turns a photo by `angle_degrees`, scales it by `scale` and shifts it."""
    a = np.deg2rad(angle_degrees)
    return np.array(
        [[scale * np.cos(a), -scale * np.sin(a), shift[0]], [scale * np.sin(a), scale * np.cos(a), shift[1]]]
    )


@pytest.mark.parametrize("angle", [0, 60, 90])
def test_the_crops_scale_is_its_columns_length_whatever_the_turn(angle):
    """A crop of 64 px at 2 crop pixels per photo pixel: a frame of 32 px is enlarged 64 / (32 * 2) = 1 times, turned
    by any angle (the matrix's first entry is 2 cos(angle): 1 at 60 degrees, 0 at 90)."""
    photo = PIL.Image.new("RGB", (200, 200), (90, 90, 90))
    paste = PasteBack(photo, turned(angle, 2.0, (32.0, 32.0)), 64)
    assert paste.zoom == pytest.approx(2.0)
    assert paste.enlargement(32) == pytest.approx(1.0)
    assert paste.enlargement(16) == pytest.approx(2.0)


def test_the_heads_colour_is_moved_to_the_photos_persons_along_the_seam():
    """The photo's person is grey 128 everywhere in the crop; the generated head is grey 0.45 (114.75): the offset
    measured along the seam (128 / 255 - 0.45) takes the head to the photo's 128 inside (pushed the other way it
    would be 102, left alone 115)."""
    photo = PIL.Image.fromarray(np.full((128, 128, 3), 128, np.uint8))
    paste = PasteBack(photo, np.array([[0.5, 0, 0], [0, 0.5, 0]]), 64, identity_mask=np.ones((64, 64), np.float32))
    out = paste(np.full((64, 64, 3), 0.45, np.float32))
    np.testing.assert_array_equal(out[48:80, 48:80], 128)


def test_a_scaled_down_photo_gets_the_head_at_the_same_place_scaled():
    """The crop covers x 100-300 and y 0-200 of a 400x200 photo; with --max-size 200 the photo is halved, and the
    box the paste writes in is x 50-150, y 0-100 (a pixel more on each side, as at full size)."""
    photo = PIL.Image.new("RGB", (400, 200), (90, 90, 90))
    matrix = np.array([[64 / 200, 0.0, -100 * 64 / 200], [0.0, 64 / 200, 0.0]])
    assert PasteBack(photo, matrix, 64).box == (99, 0, 301, 200)
    scaled = PasteBack(photo, matrix, 64, max_size=200)
    assert scaled.size == (200, 100) and scaled.scaled_from == (400, 200)
    assert scaled.box == (49, 0, 151, 100)


def test_the_path_the_commands_use_passes_the_persons_mask_on():
    """`paste_back_for` (generate, generate-batch and the page) gives the aligned face's person mask to the paste:
    the box is filled where the person was (its middle fully), nothing outside the person."""
    from types import SimpleNamespace

    from diffused_heads.paste import paste_back_for

    photo = PIL.Image.new("RGB", (128, 128), (90, 90, 90))
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1.0
    aligned = SimpleNamespace(matrix=np.array([[0.5, 0, 0], [0, 0.5, 0]]), mask=mask)
    paste, size = paste_back_for(PIL.Image.new("RGB", (64, 64)), aligned, photo)
    assert size is None and paste.size == (128, 128) and paste.plate is not None
    assert paste.hole[64, 64] == pytest.approx(1.0, abs=1e-3)  # photo pixel (64, 64): crop (32, 32), the middle
    assert paste.hole[10, 10] == pytest.approx(0.0, abs=1e-3)  # crop (5, 5): outside the person


def test_saved_frames_of_a_pasted_video_have_the_photos_size(tmp_path):
    """`generate --paste-back --save-frames`: the PNGs are the video's frames, at the (scaled) photo's size, not
    squashed to --size."""
    import soundfile

    hopper().save(tmp_path / "photo.png")  # 512x600
    soundfile.write(tmp_path / "s.wav", speech_like(0.2), 16000)
    args = ["--image", tmp_path / "photo.png", "--audio", tmp_path / "s.wav", "--steps", "1", "--paste-back"]
    args += ["--max-size", "300", "--size", "64", "--save-frames", tmp_path / "frames", "--output", tmp_path / "o.mp4"]
    assert generate.main([str(a) for a in args]) == 0
    names = sorted(os.listdir(tmp_path / "frames"))
    assert len(names) == 5
    assert all(PIL.Image.open(tmp_path / "frames" / name).size == (256, 300) for name in names)
