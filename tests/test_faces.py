"""Face preparation on real photos that ship inside installed packages (matplotlib's and scikit-image's)."""

import os
import sys

import numpy as np
import PIL.Image
import pytest

from diffused_heads import faces, prepare_face
from diffused_heads.faces import (
    IdentityTemplate,
    default_template,
    find_landmarks,
    prepare_identity,
    similarity_transform,
    template_from_reference,
)
from diffused_heads.media import GREEN_BACKGROUND, MediaError, export_to_video_with_audio

from helpers import logged

mediapipe = pytest.importorskip("mediapipe", reason="the faces extra (mediapipe 0.10.14) is not installed")


def hopper() -> PIL.Image.Image:
    import matplotlib

    return PIL.Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")


def astronaut() -> PIL.Image.Image:
    from skimage import data

    return PIL.Image.fromarray(data.astronaut())


def landmarks_of(image: PIL.Image.Image) -> np.ndarray:
    return find_landmarks(image)


def assert_on_template(points: np.ndarray, template: np.ndarray):
    """A real face is not the mean face: after the best similarity fit its five points stay up to ~2.7 px (at 128)
    from the template (measured: the nose base, on both photos). So: within 2 px on average, 3.5 px at most."""
    distances = np.linalg.norm(points - template, axis=1)
    assert np.sqrt((distances**2).mean()) < 2.0 and distances.max() < 3.5, distances


def test_default_template_is_the_published_crop_made_square():
    # face-processor: mean face x 0.3525, shifted by (int(0.11 w), int(0.335 h)) - top-left of its box, crop
    # int(w (1 + 0.22)) x int(h (1 + 0.335 + 0.155)) = 96 x 128; centred in a 128 square: 16 px more on the left.
    published = np.array(
        [(116.950, 123.796), (45.512, 43.462), (84.545, 45.623), (143.671, 43.024), (182.164, 39.638)]
    )
    width, height = int(224.49 * 0.3525) - int(0.19 * 0.3525), int(244.16 * 0.3525) - int(0.187 * 0.3525)
    assert (int(width * 1.22), int(height * 1.49)) == (96, 128)
    expected = published * 0.3525 + (int(0.11 * width) + 16, int(0.335 * height))
    template = default_template()
    assert template.size == 128 and template.background == GREEN_BACKGROUND
    np.testing.assert_allclose(template.points, expected, atol=1e-9)


def test_similarity_transform_recovers_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = source @ (scale * rotation).T + shift
    matrix = similarity_transform(source, target)
    np.testing.assert_allclose(matrix, np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    # No reflection, even when the points are mirrored: the best proper similarity is returned.
    mirrored = similarity_transform(source, source * (-1, 1))
    assert np.linalg.det(mirrored[:, :2]) > 0


@pytest.mark.parametrize("photo", [hopper, astronaut])
def test_prepared_frame_puts_the_face_on_the_template_and_the_background_green(photo):
    image = photo()
    frame = prepare_identity(image)
    assert frame.size == (128, 128) and frame.mode == "RGB"
    found, template = landmarks_of(frame), default_template().scaled(128)
    assert_on_template(found, template)
    # The alignment itself: detected again, the points land where the fitted transform put them.
    points = landmarks_of(image)
    matrix = similarity_transform(points, template)
    assert np.abs(found - (points @ matrix[:, :2].T + matrix[:, 2])).max() < 2.0
    distance = np.linalg.norm(np.asarray(frame, np.float32) - np.array(GREEN_BACKGROUND), axis=-1)
    assert min(distance[:6, :6].mean(), distance[:6, -6:].mean()) < 12  # a top corner is background
    assert (distance < 20).mean() > 0.15  # and a good part of the frame is the training green


def turned_scaled_shifted(image: PIL.Image.Image, case: str) -> PIL.Image.Image:
    if case in ("90", "180", "270"):
        return image.rotate(int(case), expand=True)
    if case == "scaled":
        return image.resize((image.width * 3 // 5, image.height * 3 // 5), PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (image.width + 300, image.height + 120), (90, 120, 160))
    canvas.paste(image, (260, 30))
    return canvas


@pytest.mark.parametrize("case", ["90", "180", "270", "scaled", "shifted"])
def test_the_same_photo_turned_scaled_or_shifted_gives_the_same_frame(case):
    reference = landmarks_of(prepare_identity(hopper()))
    with logged() as messages:
        moved = prepare_identity(turned_scaled_shifted(hopper(), case))
    assert np.abs(landmarks_of(moved) - reference).max() < 2.0
    if case in ("90", "180", "270"):
        assert any(f"turned by {case} degrees" in m or "turned by" in m for m in messages), messages


def test_several_faces_use_the_largest_and_say_how_many():
    group = PIL.Image.new("RGB", (1000, 620), (200, 200, 200))
    group.paste(astronaut().resize((400, 400)), (0, 100))
    group.paste(hopper(), (470, 10))
    with logged() as messages:
        frame = prepare_identity(group)
    assert any("shows 2 faces; using the largest" in m for m in messages), messages
    alone = {"hopper": np.asarray(prepare_identity(hopper()), np.float32)}
    alone["astronaut"] = np.asarray(prepare_identity(astronaut()), np.float32)

    def closest(image):  # whose face it is, by the pixels (landmarks land on the template whoever it is)
        return min(alone, key=lambda name: np.mean((np.asarray(image, np.float32) - alone[name]) ** 2))

    assert closest(frame) == "hopper"  # the larger face
    np.testing.assert_allclose(landmarks_of(frame), landmarks_of(prepare_identity(hopper())), atol=2.0)
    second = prepare_identity(group, face=1)
    assert closest(second) == "astronaut"
    np.testing.assert_allclose(landmarks_of(second), landmarks_of(prepare_identity(astronaut())), atol=2.0)
    with pytest.raises(MediaError, match="face 2 was asked for, but the photo shows 2"):
        prepare_identity(group, face=2)


def test_no_face_is_one_clear_error():
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], (200, 1, 3))
    with pytest.raises(MediaError, match="no face found in the photo"):
        prepare_identity(PIL.Image.fromarray(gradient))


def test_small_and_cut_faces_give_a_warning_and_a_frame():
    canvas = PIL.Image.new("RGB", (1600, 1200), (120, 120, 120))
    small = canvas.copy()
    small.paste(hopper().resize((130, 152)), (700, 500))  # 31 px between the outer eye corners
    with logged() as messages:
        frame = prepare_identity(small)
    assert frame.size == (128, 128) and any("the face is small (31 px" in m for m in messages), messages
    tiny = canvas.copy()
    tiny.paste(hopper().resize((90, 105)), (700, 500))  # too small to be found: one clear error
    with pytest.raises(MediaError, match="no face found"):
        prepare_identity(tiny)
    photo = hopper()
    cut = photo.crop((0, 0, photo.width, 330))  # cut just below the nose
    with logged() as messages:
        frame = prepare_identity(cut)
    assert frame.size == (128, 128) and any("cut by the photo's edge" in m for m in messages), messages
    bottom = np.asarray(frame, np.float32)[-8:]
    assert np.linalg.norm(bottom - np.array(GREEN_BACKGROUND), axis=-1).mean() < 12  # filled with the background


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK", "huge"])
def test_image_modes_and_sizes(mode, tmp_path):
    photo = hopper()
    if mode == "huge":
        photo = photo.resize((6827, 8000), PIL.Image.BICUBIC)
    elif mode == "I;16":
        photo = PIL.Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)
    else:
        photo = photo.convert(mode)
    path = tmp_path / ("photo.jpg" if mode in ("CMYK", "huge") else "photo.png")
    photo.save(path)
    frame = prepare_identity(str(path))
    assert frame.size == (128, 128) and frame.mode == "RGB"
    # A working, aligned frame (grey photos give the detector less to go on: within 3 px on average).
    distances = np.linalg.norm(landmarks_of(frame) - default_template().scaled(128), axis=1)
    assert np.sqrt((distances**2).mean()) < 3.0, distances
    if mode in ("L", "I;16"):  # grey stays grey and is not clipped to white
        pixels = np.asarray(frame, np.float32)
        face = pixels[50:90, 45:85]
        assert 40 < face.mean() < 220


def test_video_frames_use_smoothed_landmarks(tmp_path):
    photo = hopper().crop((0, 0, 512, 512))
    frames = []
    rng = np.random.default_rng(0)
    for _ in range(8):  # the head shakes by a few pixels around one place
        shifted = PIL.Image.new("RGB", photo.size, (0, 0, 0))
        shifted.paste(photo, tuple(int(v) for v in rng.integers(-3, 4, 2)))
        frames.append(np.asarray(shifted))
    video = tmp_path / "clip.mp4"
    export_to_video_with_audio(np.stack(frames), None, str(video), size=None)
    frame = prepare_identity(str(video), frame=0)
    # Aligned on the mean of the 7 frames' points, the chosen frame is off by its own shake (up to 3 px of the
    # photo, 1 px of the frame) on top of the face's own fit residual.
    distances = np.linalg.norm(landmarks_of(frame) - default_template().scaled(128), axis=1)
    assert np.sqrt((distances**2).mean()) < 2.5, distances
    decoded = faces.read_video_frames(str(video), start=0, count=7)
    np.testing.assert_allclose(
        faces.smoothed_video_landmarks(decoded), np.mean([landmarks_of(f) for f in decoded], axis=0)
    )


def test_a_reference_frame_calibrates_the_template(tmp_path):
    custom = IdentityTemplate(
        points=[tuple(p) for p in (default_template().scaled(128) - 64) * 0.8 + 64], background=(20, 200, 90)
    )
    reference = prepare_identity(hopper(), template=custom)
    reference.save(tmp_path / "reference.png")
    measured = template_from_reference(str(tmp_path / "reference.png"))
    assert_on_template(np.asarray(measured.points), np.asarray(custom.points))
    assert np.abs(np.array(measured.background) - (20, 200, 90)).max() <= 6
    # Stored with a model, it is what preparation for that model uses.
    measured.save(tmp_path)
    loaded = faces.model_template(str(tmp_path))
    assert loaded.points == measured.points and loaded.background == measured.background
    frame = prepare_identity(astronaut(), template=loaded)
    assert_on_template(landmarks_of(frame), np.asarray(custom.points))


def test_without_the_extra_face_preparation_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe now fails
    monkeypatch.setattr(faces.FaceModels, "_shared", None)
    assert not faces.faces_available()
    with pytest.raises(MediaError, match=r"pip install \"diffused-heads-diffusers\[faces\]\""):
        prepare_identity(hopper())
    hopper().save(tmp_path / "photo.png")
    assert prepare_face.main(["--image", str(tmp_path / "photo.png"), "--output", str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: face preparation needs the faces extra")
    assert not (tmp_path / "out.png").exists()


def test_prepare_face_command(tmp_path, capsys):
    hopper().save(tmp_path / "photo.jpg")
    out = tmp_path / "prepared.png"
    args = ["--image", str(tmp_path / "photo.jpg"), "--output", str(out), "--background", "0,0,255", "--size", "96"]
    assert prepare_face.main(args) == 0
    frame = PIL.Image.open(out)
    assert frame.size == (96, 96)
    corner = np.asarray(frame.convert("RGB"), np.float32)[:8, :8]
    assert np.linalg.norm(corner - (0, 0, 255), axis=-1).mean() < 12
    assert prepare_face.main(args) == 1 and "exists" in capsys.readouterr().err
    kept = tmp_path / "kept.png"
    assert prepare_face.main(["--image", str(tmp_path / "photo.jpg"), "--output", str(kept), "--keep-background"]) == 0
    assert np.linalg.norm(np.asarray(PIL.Image.open(kept), np.float32)[:8, :8] - GREEN_BACKGROUND, axis=-1).mean() > 40


# --- in generate ---


def generate(tmp_path, *args):
    from diffused_heads import generate as tool

    out = tmp_path / f"video{len(list(tmp_path.glob('video*.mp4')))}.mp4"
    base = ["--output", str(out), "--duration", "0.2", "--steps", "1", "--size", "32"]
    return tool.main(base + [str(a) for a in args])


def test_generate_prepares_a_photo_and_not_a_ready_crop(tmp_path, capsys):
    from diffused_heads import example_image_path
    from diffused_heads.media import load_identity_frame

    hopper().save(tmp_path / "photo.jpg")
    assert generate(tmp_path, "--image", tmp_path / "photo.jpg", "--save-prepared", tmp_path / "used.png") == 0
    assert "note: prepared the face" in capsys.readouterr().err
    expected = prepare_identity(str(tmp_path / "photo.jpg"))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "used.png")), np.asarray(expected))

    assert (
        generate(tmp_path, "--image", tmp_path / "photo.jpg", "--no-prepare", "--save-prepared", tmp_path / "raw.png")
        == 0
    )
    assert "prepared the face" not in capsys.readouterr().err
    raw = load_identity_frame(str(tmp_path / "photo.jpg"))
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "raw.png")), np.asarray(raw))

    # The built-in model's own drawn example is a ready crop (a face on the training green): used as it is.
    assert generate(tmp_path, "--image", example_image_path(), "--save-prepared", tmp_path / "example.png") == 0
    assert "prepared the face" not in capsys.readouterr().err
    np.testing.assert_array_equal(
        np.asarray(PIL.Image.open(tmp_path / "example.png")), np.asarray(PIL.Image.open(example_image_path()))
    )


def test_generate_uses_the_models_template_and_warns_without_the_extra(tmp_path, capsys, monkeypatch):
    from diffused_heads import builtin_model_path

    model = tmp_path / "model"
    import shutil

    shutil.copytree(builtin_model_path(), model)
    template = IdentityTemplate(points=[tuple(p) for p in default_template().scaled(128) * 0.9 + 6], source="test")
    template.save(str(model))
    hopper().save(tmp_path / "photo.jpg")
    args = ["--image", tmp_path / "photo.jpg", "--model", model, "--save-prepared", tmp_path / "used.png"]
    assert generate(tmp_path, *args) == 0
    assert "aligned with test" in capsys.readouterr().err
    assert_on_template(landmarks_of(PIL.Image.open(tmp_path / "used.png")), np.asarray(template.points))

    monkeypatch.setitem(sys.modules, "mediapipe", None)
    monkeypatch.setattr(faces.FaceModels, "_shared", None)
    assert generate(tmp_path, "--image", tmp_path / "photo.jpg") == 0
    err = capsys.readouterr().err
    assert "warning: the image is not a model-ready crop" in err and "diffused-heads-diffusers[faces]" in err


def test_the_converter_stores_a_template_measured_on_a_reference_clip(tmp_path):
    from test_convert import TINY_ORIGINAL_ENCODER, TINY_ORIGINAL_UNET

    from diffused_heads.convert import main as convert

    from original_model import scripted_audio_encoder, traced_unet

    traced_unet(tmp_path / "crema_script.pt", size=128, **TINY_ORIGINAL_UNET)
    scripted_audio_encoder(tmp_path / "audio_encoder.pt", **TINY_ORIGINAL_ENCODER)
    custom = IdentityTemplate(
        points=[tuple(p) for p in (default_template().scaled(128) - 64) * 0.85 + 64], background=(30, 190, 70)
    )
    frame = np.asarray(prepare_identity(hopper(), template=custom))
    export_to_video_with_audio(np.stack([frame] * 8), None, str(tmp_path / "clip.mp4"), size=None)
    args = ["--unet", tmp_path / "crema_script.pt", "--audio-encoder", tmp_path / "audio_encoder.pt"]
    args += ["--output-dir", tmp_path / "model", "--reference-video", tmp_path / "clip.mp4"]
    assert convert([str(a) for a in args]) == 0
    stored = faces.model_template(str(tmp_path / "model"))
    assert_on_template(np.asarray(stored.points), np.asarray(custom.points))
    assert np.abs(np.array(stored.background) - (30, 190, 70)).max() <= 8  # through H.264
    assert "identity_template" in (tmp_path / "model" / "README.md").read_text()


def test_generate_uses_an_image_without_a_face_as_it_is(tmp_path, capsys):
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    PIL.Image.fromarray(gradient).save(tmp_path / "drawing.png")
    assert generate(tmp_path, "--image", tmp_path / "drawing.png") == 0
    assert "warning: no face found in the photo" in capsys.readouterr().err


def test_generate_batch_prepares_photos_as_generate_does(tmp_path):
    import soundfile

    from diffused_heads.jobs import BatchSettings, Job, prepare_job
    from diffused_heads.media import load_identity_frame

    hopper().save(tmp_path / "photo.jpg")
    soundfile.write(tmp_path / "speech.wav", np.zeros(3200, np.float32), 16000)
    job = Job(0, str(tmp_path / "photo.jpg"), str(tmp_path / "speech.wav"), str(tmp_path / "out.mp4"), seed=0)
    identity, _, _ = prepare_job(job, BatchSettings(prepare=True))
    expected = prepare_identity(str(tmp_path / "photo.jpg"))
    np.testing.assert_array_equal(np.asarray(identity), np.asarray(expected))
    raw, _, _ = prepare_job(job, BatchSettings(prepare=False))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(load_identity_frame(str(tmp_path / "photo.jpg"))))
