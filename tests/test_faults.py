"""The commands under hostile input and faults: one `error:` line that names the file, nothing half-written, a
quick `--help`, quiet face models."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import soundfile

from diffused_heads import example_audio_path, generate, media, prepare_face

from helpers import speech_like


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A small file of 20000x20000 pixels (a decompression bomb) and one of 13000x13000."""
    folder = tmp_path_factory.mktemp("huge")
    PIL.Image.new("RGB", (20000, 20000)).save(folder / "bomb.png")
    PIL.Image.new("L", (13000, 13000)).save(folder / "big.png")
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("name", ["bomb.png", "big.png"])
def test_an_image_with_too_many_pixels_is_refused_before_decoding(huge_png, name, tmp_path, capsys):
    path = huge_png / name
    out = tmp_path / "o.mp4"
    assert generate.main(["--image", str(path), "--output", str(out), "--duration", "0.2", "--steps", "1"]) == 1
    line = one_error_line(capsys)
    assert str(path) in line and "100 million" in line
    assert prepare_face.main(["--image", str(path), "--output", str(tmp_path / "f.png")]) == 1
    assert str(path) in one_error_line(capsys)
    assert os.listdir(tmp_path) == []
    with pytest.raises(media.MediaError, match="more than the 1 million"):
        media.load_identity_frame(str(path), max_pixels=1_000_000)


def test_an_audio_file_name_that_is_not_utf8_is_read(tmp_path):
    name = os.fsdecode(b"sp\xe9ech.wav")
    with open(tmp_path / name, "wb") as f:  # soundfile itself takes UTF-8 names only
        soundfile.write(f, speech_like(0.3), 16000, format="WAV")
    audio = media.load_audio(str(tmp_path / name))
    assert len(audio) == int(0.3 * 16000)
    odd_video = os.fsdecode(b"v\xe9.mp4")
    media.export_to_video_with_audio(np.zeros((3, 16, 16, 3), np.float32), audio, str(tmp_path / odd_video), size=None)
    assert len(media.read_video_frames(str(tmp_path / odd_video), count=None)) == 3
    assert len(media.load_audio(str(tmp_path / odd_video))) == 3 * 640


def test_a_failed_write_of_an_extra_file_is_one_line_that_names_it(tmp_path, monkeypatch, capsys):
    blocked = str(tmp_path / "used.png")

    def refuse(image, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(media, "save_image", refuse)
    args = ["--output", str(tmp_path / "o.mp4"), "--duration", "0.2", "--steps", "1", "--save-prepared", blocked]
    assert generate.main(args) == 1
    assert one_error_line(capsys) == f"error: Permission denied: {blocked}"
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    args = ["--output", str(tmp_path / "o.mp4"), "--save-frames", str(tmp_path / "frames")]
    assert generate.main(args) == 1
    assert one_error_line(capsys).startswith("error: --output: cannot write in")


def test_a_frame_folder_that_cannot_be_written_is_found_before_generating(tmp_path, monkeypatch, capsys):
    (tmp_path / "frames").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and "frames" not in str(path))
    args = ["--output", str(tmp_path / "o.mp4"), "--duration", "0.2", "--steps", "1"]
    assert generate.main(args + ["--save-frames", str(tmp_path / "frames")]) == 1
    assert one_error_line(capsys).startswith(f"error: --save-frames {tmp_path / 'frames'}: cannot write in")
    assert sorted(os.listdir(tmp_path)) == ["frames"]


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_help_answers_without_importing_torch(tmp_path):
    code = (
        "import sys\nfrom diffused_heads.cli import main\n"
        "for command in ('generate', 'generate-batch', 'prepare-face', 'make-dataset', 'app'):\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'gradio', 'mediapipe', 'diffusers') if m in sys.modules))"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"


@pytest.mark.slow
def test_face_preparation_prints_none_of_mediapipes_start_up_lines(tmp_path):
    import matplotlib.cbook

    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    command = [sys.executable, "-m", "diffused_heads", "prepare-face", "--image", str(photo), "--output", "f.png"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == "Wrote f.png (128x128)"


def test_a_silent_or_short_speech_file_through_the_command(tmp_path, capsys):
    soundfile.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    soundfile.write(tmp_path / "blip.wav", speech_like(0.01), 16000)
    base = ["--steps", "1", "--size", "32"]
    assert generate.main(["--audio", str(tmp_path / "silent.wav"), "--output", str(tmp_path / "s.mp4"), *base]) == 0
    assert f"warning: {tmp_path / 'silent.wav'} is silent" in capsys.readouterr().err
    assert generate.main(["--audio", str(tmp_path / "blip.wav"), "--output", str(tmp_path / "b.mp4"), *base]) == 1
    assert "too short" in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["blip.wav", "s.mp4", "silent.wav"]
    assert example_audio_path()  # the example is untouched
