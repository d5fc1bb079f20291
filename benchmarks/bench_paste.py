"""What pasting a frame back into the photo costs, beside one UNet evaluation of the built-in model, in one run.

    python benchmarks/bench_paste.py                 # a 1-megapixel photo (the astronaut, enlarged to 1024x1024)
    python benchmarks/bench_paste.py --side 2048     # 4 megapixels

Prints milliseconds per pasted frame (median of --repeats, after one warm-up) and per UNet call of the built-in
model (batch 1, float32, its own sample size), and their ratio.
"""

import argparse
import statistics
import time

import numpy as np
import PIL.Image
import torch


def median_ms(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=1024, help="the photo's side in pixels")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from skimage import data

    from diffused_heads import runtime
    from diffused_heads.faces import align_identity
    from diffused_heads.paste import PasteBack

    photo = PIL.Image.fromarray(data.astronaut()).resize((args.side, args.side), PIL.Image.LANCZOS)
    aligned = align_identity(photo)
    pipe = runtime.load_pipeline(None, "cpu", "float32")
    unet = pipe.unet
    size = unet.config.sample_size
    paste = PasteBack(photo, aligned.matrix, aligned.image.width, identity_mask=aligned.mask, max_size=args.side)
    frame = np.asarray(aligned.image.resize((size, size), PIL.Image.LANCZOS), np.float32) / 255.0
    pasting = median_ms(lambda: paste(frame), args.repeats)

    x = torch.randn(1, unet.config.in_channels, size, size)
    identity = torch.randn(1, 3, size, size)
    motion = torch.randn(1, 2 * unet.config.motion_frame_channels, size, size)
    audio = torch.randn(1, unet.config.audio_context, unet.config.audio_embedding_dim)
    with torch.no_grad():
        evaluation = median_ms(lambda: unet(x, torch.tensor([500]), identity, motion, audio), args.repeats)
    box = paste.box
    print(f"photo {args.side}x{args.side} ({args.side**2 / 1e6:.1f} MP), head box {box[2] - box[0]}x{box[3] - box[1]}")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"paste one frame:                 {pasting:7.1f} ms")
    print(f"one UNet call, built-in model:   {evaluation:7.1f} ms ({size}x{size})")
    print(f"paste / UNet call:               {pasting / evaluation:7.2f}")


if __name__ == "__main__":
    main()
