import os
import subprocess
import time
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import pytest
import soundfile

from diffused_heads import generate, runtime
from diffused_heads.errors import ArgumentError
from diffused_heads.media import MediaError, export_to_video_with_audio, load_audio, load_identity_frame, save_frames

from helpers import logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sine(rate, seconds=1.0, freq=440.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1).astype(np.float32)


def write_with_av(path, samples, rate, codec, container_format=None, with_video=False):
    with av.open(str(path), mode="w", format=container_format) as container:
        if with_video:
            video = container.add_stream("libx264", rate=Fraction(25))
            video.width = video.height = 32
            video.pix_fmt = "yuv420p"
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo" if samples.shape[1] == 2 else "mono"
        if with_video:
            for i in range(int(25 * len(samples) / rate)):
                image = np.full((32, 32, 3), i * 5 % 255, np.uint8)
                for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
        planar = np.ascontiguousarray(samples.T)
        fmt = stream.codec_context.format.name
        for offset in range(0, len(samples), 1024):
            piece = planar[:, offset : offset + 1024]
            if not fmt.endswith("p"):
                piece = np.ascontiguousarray(piece.T).reshape(1, -1)
            piece = (piece * 32767).astype(np.int16) if fmt.startswith("s16") else piece.astype(np.float32)
            frame = av.AudioFrame.from_ndarray(piece, format=fmt, layout=stream.layout.name)
            frame.sample_rate, frame.pts = rate, offset
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def dominant(x, rate=16000):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


# Every format at every rate it can store (Opus in WebM takes 8, 12, 16, 24 or 48 kHz).
AUDIO_CASES = [
    (kind, rate)
    for kind in ("wav", "flac", "ogg", "mp3", "m4a", "mp4", "webm")
    for rate in (8000, 22050, 44100, 48000)
    if not (kind == "webm" and rate not in (8000, 48000))
]


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("kind, rate", AUDIO_CASES)
def test_audio_formats_rates_and_channels(kind, rate, channels, tmp_path):
    path = tmp_path / f"clip.{kind}"
    samples = sine(rate, channels=channels)
    if kind in ("wav", "flac", "ogg", "mp3"):
        subtype = {"ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}.get(kind)
        soundfile.write(path, samples, rate, subtype=subtype)
    elif kind == "m4a":
        write_with_av(path, samples, rate, "aac", "mp4")
    elif kind == "mp4":
        write_with_av(path, samples, rate, "aac", "mp4", with_video=True)
    else:
        write_with_av(path, samples, rate, "libopus", "webm")
    audio = load_audio(str(path))
    assert audio.dtype == np.float32 and audio.ndim == 1
    # Lossy codecs add priming samples; the length stays within 0.1 s of one second.
    assert abs(len(audio) - 16000) <= 1600
    assert abs(dominant(audio[2000:-2000]) - 440) <= 3
    assert 0.25 < np.abs(audio[4000:12000]).max() < 0.75


def test_start_duration_and_silence_warnings(tmp_path):
    path = tmp_path / "long.wav"
    soundfile.write(path, sine(16000, seconds=10.0), 16000)
    with logged() as messages:
        part = load_audio(str(path), start=1.0, duration=0.5)
        assert len(part) == 8000 and not messages
        assert len(load_audio(str(path))) == 160000 and not messages  # length is the model's call
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros((16000, 1), np.float32), 16000)
    with logged() as messages:
        assert len(load_audio(str(silent))) == 16000
    assert messages == [f"warning: {silent} is silent; the face will not speak"]
    # Only the selected part is silent: the warning names that part, not the whole file.
    gap = tmp_path / "gap.wav"
    soundfile.write(gap, np.concatenate([sine(16000, 1.0)[:, 0], np.zeros(16000, np.float32)]), 16000)
    with logged() as messages:
        load_audio(str(gap), start=1.25, duration=0.5)
    assert messages == [f"warning: the part of {gap} from 1.25s to 1.75s is silent; the face will not speak"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"", "empty"),
        (b"just some text, not audio\n" * 20, "could not be read"),
        ("short", "too short"),
        ("image", "no audio stream|could not be read"),
    ],
)
def test_bad_audio(content, message, tmp_path):
    path = tmp_path / "audio.wav"
    if content == "short":
        soundfile.write(path, np.zeros((300, 1), np.float32), 16000)
    elif content == "image":
        path = tmp_path / "face.png"
        PIL.Image.new("RGB", (16, 16)).save(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(MediaError, match=message):
        load_audio(str(path))


# Every image format with every mode it stores.
IMAGE_CASES = [
    (mode, ext)
    for mode in ("RGB", "RGBA", "L", "P", "LA", "I;16")
    for ext in ("png", "jpg", "webp", "bmp")
    if not (ext in ("jpg", "bmp") and mode in ("RGBA", "LA", "I;16"))
    and not (ext == "jpg" and mode == "P")
    and not (ext == "webp" and mode in ("P", "LA", "I;16"))
]


@pytest.mark.parametrize("mode, ext", IMAGE_CASES)
def test_identity_frame_modes_and_formats(mode, ext, tmp_path):
    image = (
        PIL.Image.new("RGB", (60, 40), (200, 120, 80)).convert(mode)
        if mode != "I;16"
        else PIL.Image.new("I;16", (60, 40), 3000)
    )
    path = tmp_path / f"face.{ext}"
    image.save(path)
    with logged() as messages:
        frame = load_identity_frame(str(path))
    assert frame.mode == "RGB" and frame.size == (40, 40)
    assert any("centre-cropped" in m for m in messages)
    assert load_identity_frame(str(path), resize="stretch").size == (60, 40)


def test_transparent_pixels_become_the_training_background(tmp_path):
    path = tmp_path / "cutout.png"
    PIL.Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(path)
    assert load_identity_frame(str(path)).getpixel((5, 5)) == (0, 177, 64)


def test_exif_orientation_is_honoured(tmp_path):
    image = PIL.Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 20, 20))  # left half black
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    frame = load_identity_frame(str(path), resize="stretch")
    assert frame.size == (20, 40)
    assert sum(frame.getpixel((10, 5))) < 100 and sum(frame.getpixel((10, 35))) > 600


def test_identity_frame_from_a_video(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (20, 120, 220)]).astype(np.float32) / 255
    export_to_video_with_audio(frames, None, str(path), size=None)
    assert abs(np.asarray(load_identity_frame(str(path))).mean() - 20) < 8
    assert abs(np.asarray(load_identity_frame(str(path), frame=2)).mean() - 220) < 8
    a = load_identity_frame(str(path), random_frame=True, seed=3)
    b = load_identity_frame(str(path), random_frame=True, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(MediaError, match="no frame 9"):
        load_identity_frame(str(path), frame=9)
    audio_only = tmp_path / "sound.m4a"
    write_with_av(audio_only, sine(16000), 16000, "aac", "mp4")
    with pytest.raises(MediaError):
        load_identity_frame(str(audio_only))


def test_video_written_and_read_back(tmp_path):
    path = tmp_path / "out.mp4"
    rng = np.random.RandomState(0)
    frames = rng.rand(30, 16, 16, 3).astype(np.float32)
    audio = sine(16000, seconds=1.3)[:, 0]
    export_to_video_with_audio(frames, audio, str(path), size=64)
    with av.open(str(path)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert video.average_rate == 25 and (video.width, video.height) == (64, 64)
        decoded = sum(1 for _ in container.decode(video))
        assert decoded == 30
        assert sound.codec_context.name == "aac"
        duration = float(sound.duration * sound.time_base)
        assert abs(duration - 30 / 25) <= 1 / 25 + 0.03
    assert [p for p in os.listdir(tmp_path)] == ["out.mp4"]
    with pytest.raises(FileExistsError):
        export_to_video_with_audio(frames, audio, str(path))
    paths = save_frames(frames[:3], str(tmp_path / "png"))
    assert len(paths) == 3 and PIL.Image.open(paths[0]).size == (16, 16)


def test_bad_frame_size_is_refused_before_any_file_exists(tmp_path):
    with pytest.raises(ValueError):
        export_to_video_with_audio(np.zeros((2, 15, 15, 3), np.float32), None, str(tmp_path / "x.mp4"), size=None)
    assert os.listdir(tmp_path) == []


def test_encoder_failure_mid_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    calls = []
    real = av.VideoFrame.from_ndarray

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    frames = np.zeros((6, 16, 16, 3), np.float32)
    with pytest.raises(RuntimeError, match="No space"):
        export_to_video_with_audio(frames, None, str(tmp_path / "new.mp4"), size=None)
    assert len(calls) == 3 and os.listdir(tmp_path) == []
    old = tmp_path / "old.mp4"
    old.write_bytes(b"previous video")
    calls.clear()
    with pytest.raises(RuntimeError, match="No space"):
        export_to_video_with_audio(frames, None, str(old), size=None, overwrite=True)
    assert os.listdir(tmp_path) == ["old.mp4"] and old.read_bytes() == b"previous video"


def test_video_is_encoded_under_another_name_then_renamed(tmp_path, monkeypatch):
    final = tmp_path / "out.mp4"
    final.write_bytes(b"previous video")
    opened = []
    real_open = av.open

    def recording_open(path, *args, **kwargs):
        opened.append((str(path), final.read_bytes()))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    export_to_video_with_audio(np.zeros((3, 16, 16, 3), np.float32), None, str(final), size=None, overwrite=True)
    [(path, final_content_meanwhile)] = opened
    assert os.path.dirname(path) == str(tmp_path) and path != str(final)
    assert final_content_meanwhile == b"previous video"
    assert os.listdir(tmp_path) == ["out.mp4"] and final.read_bytes() != b"previous video"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_video_gets_the_mode_open_would_give(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        export_to_video_with_audio(np.zeros((2, 16, 16, 3), np.float32), None, str(tmp_path / "v.mp4"), size=None)
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "v.mp4").st_mode & 0o777 == mode


# --- the command-line tool ---


@pytest.fixture
def tiny_model(tmp_path_factory):
    from helpers import tiny_pipeline

    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder


def cli(*args):
    return generate.main([str(a) for a in args])


def test_cli_end_to_end_on_a_tiny_model(tiny_model, tmp_path, capsys):
    image, sound, out = tmp_path / "face.png", tmp_path / "speech.flac", tmp_path / "out.mp4"
    PIL.Image.new("RGB", (50, 40), (200, 150, 120)).save(image)
    soundfile.write(sound, sine(44100, seconds=0.5, channels=2), 44100)
    code = cli(
        "--image",
        image,
        "--audio",
        sound,
        "--model",
        tiny_model,
        "--output",
        out,
        "--steps",
        2,
        "--scheduler",
        "ddim",
        "--save-frames",
        tmp_path / "frames",
        "--size",
        64,
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"Wrote {out}" in captured.out
    with av.open(str(out)) as container:
        frames = (8000 + 2560 - 3200) // 640 + 1  # 0.5 s of audio at 16 kHz
        assert container.streams.video[0].frames == frames and container.streams.audio
    assert len(os.listdir(tmp_path / "frames")) == frames


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing_image", "identity image not found"),
        ("audio_as_image", "not an image or video"),
        ("text_as_audio", "could not be read"),
        ("empty_audio", "empty"),
        ("exists", "exists"),
        ("bad_folder", "does not exist"),
        ("bad_model", "no such folder"),
        ("empty_model_folder", "not a diffusers model folder"),
        ("broken_model", "could not be loaded"),
        ("not_mp4", "must end in .mp4"),
    ],
)
def test_cli_bad_input(setup, message, tiny_model, tmp_path, capsys):
    image, sound, out = tmp_path / "face.png", tmp_path / "speech.wav", tmp_path / "out.mp4"
    PIL.Image.new("RGB", (40, 40)).save(image)
    soundfile.write(sound, sine(16000, seconds=0.2), 16000)
    model = tiny_model
    if setup == "missing_image":
        image = tmp_path / "nope.png"
    elif setup == "audio_as_image":
        image = sound
    elif setup == "text_as_audio":
        sound = tmp_path / "notes.txt"
        sound.write_text("hello\n" * 50)
    elif setup == "empty_audio":
        sound = tmp_path / "empty.wav"
        sound.write_bytes(b"")
    elif setup == "exists":
        out.write_bytes(b"old")
    elif setup == "bad_folder":
        out = tmp_path / "missing" / "out.mp4"
    elif setup == "bad_model":
        model = tmp_path / "no-model"
    elif setup == "empty_model_folder":
        model = tmp_path / "empty-model"
        model.mkdir()
    elif setup == "broken_model":
        model = tmp_path / "broken-model"
        model.mkdir()
        (model / "model_index.json").write_text("{ not json")
    elif setup == "not_mp4":
        out = tmp_path / "out.avi"
    code = cli("--image", image, "--audio", sound, "--model", model, "--output", out, "--steps", 1)
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    if setup == "exists":
        assert out.read_bytes() == b"old"
    else:
        assert not out.exists()


def test_cli_help_documents_every_option():
    result = subprocess.run(["diffused-heads", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in (
        "--image",
        "--audio",
        "--output",
        "--model",
        "--steps",
        "--scheduler",
        "--seed",
        "--device",
        "--dtype",
        "--stabilize-every",
        "--frame",
        "--random-frame",
        "--resize",
        "--start",
        "--duration",
        "--size",
        "--save-frames",
        "--overwrite",
    ):
        assert option in result.stdout


def test_a_model_name_that_is_no_folder_fails_at_once_when_the_hub_cannot_be_had(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    args = ("--model", "nope-model", "--output", tmp_path / "o.mp4", "--duration", "0.2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    assert cli(*args) == 1
    assert time.perf_counter() - started < 10
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "nope-model is neither a folder here nor a Hub model in the local cache" in line
    assert "HF_HUB_OFFLINE" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert cli(*args) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "nope-model is neither a folder here nor reachable on the Hub" in line
    assert not (tmp_path / "o.mp4").exists()


def decoded_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_generate_passes_its_options_to_the_pipeline(tiny_model, tmp_path, stream_calls):
    calls = stream_calls
    sound = tmp_path / "speech.wav"
    soundfile.write(sound, sine(16000, seconds=0.3), 16000)
    common = ("--model", tiny_model, "--audio", sound, "--steps", 2)
    assert cli(*common, "--output", tmp_path / "a.mp4", "--seed", 1, "--stabilize-every", 3, "--size", 48) == 0
    assert cli(*common, "--output", tmp_path / "b.mp4", "--seed", 1, "--size", 48) == 0
    assert cli(*common, "--output", tmp_path / "c.mp4", "--seed", 2, "--size", 48) == 0
    assert [c["stabilize_every"] for c in calls] == [3, None, None]
    assert [c["num_inference_steps"] for c in calls] == [2, 2, 2]
    a, b, c = (decoded_frames(tmp_path / name) for name in ("a.mp4", "b.mp4", "c.mp4"))
    assert a.shape[1:] == (48, 48, 3)  # --size sets the width and height
    seeds_differ = np.abs(b.astype(int) - c.astype(int)).mean()
    assert seeds_differ > 5, seeds_differ  # --seed changes the noise
    assert cli(*common, "--output", tmp_path / "b2.mp4", "--seed", 1, "--size", 48) == 0
    assert np.array_equal(decoded_frames(tmp_path / "b2.mp4"), b)  # and the same seed gives the same video


def test_stereo_loads_as_the_mean_of_its_channels(tmp_path):
    left, right = sine(16000, freq=440.0)[:, 0], 0.5 * sine(16000, freq=1000.0)[:, 0]
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(str(path)), (left + right) / 2, atol=1e-6)


def test_start_and_duration_are_seconds_of_the_file_at_its_own_rate(tmp_path):
    from scipy.signal import chirp, resample_poly

    rate = 44100
    t = np.arange(2 * rate) / rate
    signal = (0.5 * chirp(t, f0=100, t1=2.0, f1=3000)).astype(np.float32)  # every segment sounds different
    path = tmp_path / "chirp.wav"
    soundfile.write(path, signal, rate, subtype="FLOAT")
    part = load_audio(str(path), start=0.75, duration=0.5)
    assert len(part) == 8000
    expected = resample_poly(signal[int(0.75 * rate) : int(1.25 * rate)].astype(np.float64), 160, 441)
    np.testing.assert_allclose(part[400:-400], expected[400:-400], atol=2e-3)  # away from the cut edges


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (61, 40)])
def test_non_square_images_are_cropped_at_the_centre(size, tmp_path):
    width, height = size
    image = PIL.Image.new("RGB", size, (255, 0, 0))
    side = min(size)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste((0, 0, 255), (left, top, left + side, top + side))  # the centre square is blue, the rest red
    path = tmp_path / "face.png"
    image.save(path)
    frame = np.asarray(load_identity_frame(str(path)))
    assert frame.shape == (side, side, 3)
    assert (frame == (0, 0, 255)).all()
    stretched = np.asarray(load_identity_frame(str(path), resize="stretch"))
    assert stretched.shape == (height, width, 3)


def test_default_threads_leave_out_the_cores_others_keep_busy(monkeypatch):
    import torch

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "busy_cores", lambda since=None: 0.0)
    assert runtime.configure_threads() == cores == torch.get_num_threads()
    assert runtime.configure_threads(processes_per_node=cores) == 1
    monkeypatch.setattr(runtime, "busy_cores", lambda since=None: float(cores))
    assert runtime.configure_threads() == 1
    monkeypatch.setattr(runtime, "busy_cores", lambda since=None: None)  # not measurable: all of this process's share
    assert runtime.configure_threads() == cores
    assert runtime.configure_threads(3) == 3 == torch.get_num_threads()
    with pytest.raises(ArgumentError, match="threads must be at least 1"):
        runtime.configure_threads(0)
    monkeypatch.undo()
    # A reading taken earlier counts the time since as the interval: no wait.
    from diffused_heads.system import cpu_ticks

    earlier = cpu_ticks()
    time.sleep(0.3)
    started = time.monotonic()
    assert runtime.busy_cores(since=earlier) is not None
    assert time.monotonic() - started < 0.1
    measured = runtime.busy_cores(interval=0.05)
    assert measured is None or 0.0 <= measured <= os.cpu_count()


def top_level_boxes(path):
    """The names of an MP4 file's top-level boxes, in order."""
    data, names, at = open(path, "rb").read(), [], 0
    while at + 8 <= len(data):
        size, name = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        names.append(name)
        at += size if size else len(data)
    return names


def test_a_live_video_is_a_fragmented_mp4_that_plays_while_it_grows(tmp_path):
    """Live: an empty `moov` first, then one fragment (`moof` + `mdat`) per second, so a player can open the file
    before it is finished; by default: one `mdat` and the `moov` at the end, as players expect of a finished file."""
    from diffused_heads.media import VideoWriter

    frames = np.random.default_rng(0).random((60, 16, 16, 3)).astype(np.float32)
    writer = VideoWriter(str(tmp_path / "live.mp4"), speech_like_audio(60), size=None, live=True)
    with writer:
        for frame in frames:
            writer.write(frame)
        # Before the end the file is there, under its own name, and already holds a playable fragment.
        boxes_meanwhile = top_level_boxes(tmp_path / "live.mp4")
        playable_meanwhile = sum(1 for _ in av.open(str(tmp_path / "live.mp4")).decode(video=0))
    assert boxes_meanwhile[:2] == ["ftyp", "moov"] and "moof" in boxes_meanwhile
    assert playable_meanwhile >= 20  # the first second, less what the decoder still holds
    boxes = top_level_boxes(tmp_path / "live.mp4")
    assert boxes.count("moof") >= 2 and boxes.index("moov") < boxes.index("mdat")

    with VideoWriter(str(tmp_path / "plain.mp4"), speech_like_audio(60), size=None) as writer:
        for frame in frames:
            writer.write(frame)
    plain = top_level_boxes(tmp_path / "plain.mp4")
    assert "moof" not in plain and plain.count("mdat") == 1


def speech_like_audio(num_frames):
    return (0.2 * np.sin(np.arange(num_frames * 640) / 10.0)).astype(np.float32)


def test_an_image_is_written_beside_its_name_and_given_the_mode_open_gives(tmp_path, monkeypatch):
    """`save_image` writes a temporary file in the output's own folder (so the rename never crosses file
    systems), renames it, and gives it the mode a plain `open()` would (not the temporary file's 0600)."""
    import tempfile

    from diffused_heads.media import save_image

    made = []
    mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args, **kwargs):
        handle, name = mkstemp(*args, **kwargs)
        made.append(name)
        return handle, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    out = tmp_path / "frames" / "face.png"
    out.parent.mkdir()
    previous = os.umask(0o022)
    try:
        save_image(PIL.Image.new("RGB", (8, 6), (10, 20, 30)), str(out))
    finally:
        os.umask(previous)
    [temporary] = made
    assert os.path.dirname(temporary) == str(out.parent) and temporary != str(out)
    assert os.listdir(out.parent) == ["face.png"]
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert PIL.Image.open(out).getpixel((3, 3)) == (10, 20, 30)


def test_an_image_that_fails_to_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    from diffused_heads.media import save_image

    out = tmp_path / "face.png"
    PIL.Image.new("RGB", (4, 4), (1, 2, 3)).save(out)
    real_save = PIL.Image.Image.save

    def half_then_fail(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_image(PIL.Image.new("RGB", (8, 6)), str(out))
    monkeypatch.setattr(PIL.Image.Image, "save", real_save)
    assert os.listdir(tmp_path) == ["face.png"]
    assert PIL.Image.open(out).getpixel((0, 0)) == (1, 2, 3)
