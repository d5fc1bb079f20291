"""Does a model (the built-in one, or `--model`: a student, say) keep the face and the lip sync over minutes of
speech? Generates one long clip frame by frame (nothing is held but per-minute sums) and prints, per minute:

- identity PSNR outside the mouth (dB; the frames against the identity frame, as `diffused-heads evaluate`);
- r(mouth, loudness): the correlation of the drawn mouth's opening with the speech's loudness envelope.

    python benchmarks/long_clip_quality.py --minutes 5 --sheet docs/long-clip.png

The speech is the example sentence repeated with short pauses (espeak-ng sentences in between where it is
installed). `--sheet` writes a contact sheet: one frame at the start of every minute.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from diffused_heads import example_audio_path, example_image_path, runtime
from diffused_heads.measures import drawn_mouth_opening, drawn_mouth_region, outside_region, pearson, psnr
from diffused_heads.media import SAMPLING_RATE, load_audio, load_identity_frame
from diffused_heads.synthetic_data import speech_envelope

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A talking head is made one frame at a time.",
    "Every minute of speech should look as good as the first.",
]


def long_speech(seconds: float) -> np.ndarray:
    example = load_audio(example_audio_path())
    pieces = [example]
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as folder:
            for k, sentence in enumerate(SENTENCES):
                path = os.path.join(folder, f"{k}.wav")
                subprocess.run(["espeak-ng", "-w", path, sentence], check=True, capture_output=True)
                pieces.append(load_audio(path))
    pause = np.zeros(int(0.4 * SAMPLING_RATE), np.float32)
    joined = np.concatenate([np.concatenate([piece, pause]) for piece in pieces])
    total = int(seconds * SAMPLING_RATE)
    return np.tile(joined, total // len(joined) + 1)[:total]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder, Hub id or built-in name (default: the built-in model)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, help="default: the model's own")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="UNet precision (auto: bfloat16 where native)")
    parser.add_argument("--sheet", help="write a contact sheet (one frame a minute) to this PNG")
    parser.add_argument("--json", help="also write the per-minute figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = runtime.load_pipeline(args.model, "cpu", args.dtype)
    size = pipe.unet.config.sample_size
    with open(os.path.join(os.path.dirname(example_image_path()), "identity.json"), encoding="utf-8") as f:
        info = json.load(f)
    region = drawn_mouth_region(info["mouth_box"], info["size"], size)
    identity = load_identity_frame(example_image_path())
    reference = np.asarray(identity.resize((size, size), PIL.Image.BICUBIC), np.float32) / 255.0
    speech = long_speech(args.minutes * 60)
    envelope = speech_envelope(speech, pipe.audio_encoder.num_frames(len(speech)))
    frames_per_minute = 25 * 60
    minutes, openings, errors, sheet = [], [], [], []
    started = time.perf_counter()
    for output in pipe.stream(
        identity, speech, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)
    ):
        frame, index = output.frames[0], output.frame_index
        if index % frames_per_minute == 0:
            sheet.append(PIL.Image.fromarray((frame * 255).round().astype(np.uint8)))
        openings.append(float(drawn_mouth_opening(frame[None], region)[0]))
        mask_psnr = psnr(frame[None], reference, outside_region(size, region))
        errors.append(10 ** (-mask_psnr / 10))  # the frame's MSE outside the mouth
        if len(openings) == frames_per_minute or index + 1 == output.num_frames[0]:
            first = index + 1 - len(openings)
            row = {
                "minute": len(minutes) + 1,
                "frames": len(openings),
                "psnr_id": float(10 * np.log10(1.0 / np.mean(errors))),
                "r_mouth_loudness": pearson(openings, envelope[first : index + 1]),
                "seconds": round(time.perf_counter() - started, 1),
            }
            minutes.append(row)
            print(
                f"minute {row['minute']}: identity PSNR {row['psnr_id']:.2f} dB, r(mouth, loudness) "
                f"{row['r_mouth_loudness']:+.3f} ({row['frames']} frames, {row['seconds']:.0f} s so far)",
                flush=True,
            )
            openings, errors = [], []
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"steps": args.steps or runtime.default_steps(pipe), "minutes": minutes}, f, indent=1)
    if args.sheet:
        scale = 2
        tile = size * scale
        canvas = PIL.Image.new("RGB", (tile * len(sheet), tile + 18), "white")
        draw = PIL.ImageDraw.Draw(canvas)
        for k, image in enumerate(sheet):
            canvas.paste(image.resize((tile, tile), PIL.Image.BICUBIC), (k * tile, 18))
            draw.text((k * tile + 4, 3), f"{k}:00", fill="black")
        canvas.save(args.sheet)


if __name__ == "__main__":
    main()
