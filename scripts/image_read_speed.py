"""What a request's photo costs before the model runs: ``open_image`` (decoding, EXIF, RGB)
and Gemma 3's image processor (resize to 896 x 896, normalise), for phone-sized JPEGs decoded
in full or at the model's size (``open_image(path, 896)``: Pillow's JPEG draft), and how far
apart the two give the model's pixel values (they span -1 to 1).

    .venv/bin/python scripts/image_read_speed.py [--repeats 5]

The photos are synthetic (gradients plus noise, JPEG quality 90); best of ``repeats``.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gemma_opt.models import gemma_processor
from gemma_opt.service import open_image

SIZE = 896  # gemma-3-4b-it's image side

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()

processor = gemma_processor(SIZE, 256).image_processor
rng = np.random.default_rng(0)
print("| photo | read in full, ms (open + processor) | read at 896, ms (open + processor) | faster | pixel values: mean, max difference |")
print("|---|---|---|---|---|")
for width, height in ((4032, 3024), (8064, 6048)):  # a phone's 12 MP photo, and its 48 MP mode
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 220
    pixels += rng.integers(0, 32, pixels.shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        best, values = {}, {}
        for size in [None, SIZE] * args.repeats:
            start = time.perf_counter()
            image = open_image(path, size)
            opened = time.perf_counter()
            values[size] = processor(image, return_tensors="pt")["pixel_values"]
            done = time.perf_counter()
            best[size] = min(best.get(size, (float("inf"),)), (done - start, opened - start, done - opened))
    difference = (values[SIZE] - values[None]).abs()
    cells = [f"{b[0] * 1e3:.0f} ({b[1] * 1e3:.0f} + {b[2] * 1e3:.0f})" for b in (best[None], best[SIZE])]
    print(f"| {width} x {height} ({width * height / 1e6:.0f} MP) | {cells[0]} | {cells[1]} | "
          f"{best[None][0] / best[SIZE][0]:.1f}x | {difference.mean():.4f}, {difference.max():.3f} |")
