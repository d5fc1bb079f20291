"""Speech from a pipe: `diffused-heads generate --audio -` reads WAV or raw samples from standard input as they
arrive and writes each frame once the speech it needs is in."""

import io
import os
import struct
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from diffused_heads.errors import MediaError
from diffused_heads.media import read_speech_stream

from helpers import speech_like, tiny_pipeline


def wav_header(rate, channels, bits, tag=1, data_size=0xFFFFFFFF):
    """A WAV header as a streaming writer makes it: the data's size unknown."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
    )


class Trickle(io.RawIOBase):
    """A stream that gives at most `step` bytes a read, as a pipe gives what has arrived."""

    def __init__(self, data, step):
        self.data, self.step = data, step

    def readable(self):
        return True

    def read1(self, n=-1):
        piece, self.data = self.data[: min(n, self.step)], self.data[min(n, self.step) :]
        return piece

    read = read1


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_a_wav_stream_of_unknown_length_is_read_as_it_arrives(step):
    samples = np.array([[0, 16384], [-32768, 32767], [8192, -8192]], dtype="<i2")
    rate, chunks = read_speech_stream(Trickle(wav_header(22050, 2, 16) + samples.tobytes(), step))
    got = np.concatenate(list(chunks))
    assert rate == 22050 and got.shape == (3, 2)
    np.testing.assert_array_equal(got, samples / 32768.0)


def test_float_24_bit_and_raw_streams():
    values = np.array([0.5, -0.25, 1.0], dtype="<f4")
    rate, chunks = read_speech_stream(Trickle(wav_header(8000, 1, 32, tag=3) + values.tobytes(), 5))
    np.testing.assert_array_equal(np.concatenate(list(chunks))[:, 0], values)
    pcm24 = bytes([0x00, 0x00, 0x40, 0xFF, 0xFF, 0xFF])  # 2^22 and -1
    rate, chunks = read_speech_stream(Trickle(wav_header(16000, 1, 24) + pcm24, 2))
    np.testing.assert_array_equal(np.concatenate(list(chunks))[:, 0], [0.5, -1 / 2**23])
    raw = np.array([1000, -1000, 5], dtype="<i2").tobytes() + b"\x01"  # ends inside a sample: that byte is dropped
    rate, chunks = read_speech_stream(Trickle(raw, 3), raw_rate=11025)
    assert rate == 11025
    np.testing.assert_array_equal(np.concatenate(list(chunks))[:, 0], np.array([1000, -1000, 5]) / 32768.0)
    with pytest.raises(MediaError, match="ends inside its header"):
        read_speech_stream(Trickle(wav_header(16000, 1, 16)[:30], 100))


def generate_from_stdin(tmp_path, output, *extra):
    """The command `generate --audio -` on a tiny model saved in `tmp_path`."""
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    return [
        sys.executable,
        "-m",
        "diffused_heads",
        "generate",
        "--model",
        str(folder),
        "--audio",
        "-",
        "--output",
        str(output),
        *extra,
    ]


@pytest.mark.slow
def test_generate_from_standard_input_writes_frames_while_the_speech_arrives(tmp_path):
    speech = (speech_like(3.0) * 32767).astype("<i2")  # the live file flushes a fragment a second (25 frames)
    output = tmp_path / "live.mp4"
    command = generate_from_stdin(tmp_path, output, "--steps", "1", "--live", "--threads", "1")
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    half = len(speech) // 2
    process.stdin.write(wav_header(16000, 1, 16) + speech[:half].tobytes())
    process.stdin.flush()
    deadline = time.time() + 60
    while time.time() < deadline and not (output.exists() and output.stat().st_size > 2000):
        time.sleep(0.2)
    assert output.exists() and output.stat().st_size > 2000, "no frames written while the speech was arriving"
    assert process.poll() is None  # still waiting for the rest
    process.stdin.write(speech[half:].tobytes())
    process.stdin.close()
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    with av.open(str(output)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == len(speech) // 640  # 75 frames: the whole speech's


def test_generate_from_an_empty_pipe_says_so_and_writes_nothing(tmp_path):
    output = tmp_path / "out.mp4"
    command = generate_from_stdin(tmp_path, output)
    result = subprocess.run(command, input=b"", capture_output=True)
    assert result.returncode == 1
    assert "too short" in result.stderr.decode() and not output.exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".mp4")]
