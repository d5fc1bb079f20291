"""Time and peak memory of converting full-size, CREMA-shaped stand-ins of the released files.

    python benchmarks/bench_convert.py

Builds a traced UNet with the released file's structure and random weights (and a scripted audio encoder)
in a temporary folder, then runs `diffused-heads convert` on them in a child process and reports its wall
time and peak resident memory (the released UNet file is 864 MB).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from original_model import scripted_audio_encoder, traced_unet  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Takes no options.")
    parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        unet_path, encoder_path = os.path.join(folder, "crema_script.pt"), os.path.join(folder, "audio_encoder.pt")
        traced_unet(unet_path, size=128)
        scripted_audio_encoder(encoder_path)
        size_mb = os.path.getsize(unet_path) / 1e6
        start = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "diffused_heads",
                "convert",
                "--unet",
                unet_path,
                "--audio-encoder",
                encoder_path,
                "--output-dir",
                os.path.join(folder, "out"),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(result.stdout + result.stderr)
        print(f"UNet file          {size_mb:8.1f} MB")
        print(f"conversion time    {seconds:8.1f} s (verification included)")
        print(f"peak memory        {peak_mb:8.1f} MB ({peak_mb / size_mb:.2f} x the UNet file)")
        sys.exit(result.returncode)


if __name__ == "__main__":
    main()
