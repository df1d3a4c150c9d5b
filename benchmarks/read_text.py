"""Read Text speed: seconds per 1024x1024 image for the default engine (PP-OCR through rapidocr, CPU).

    python benchmarks/read_text.py [--runs 5] [--batch 1]

The image is a poster rendered with Pillow: five lines of text at several sizes (and a Chinese line when a
CJK font is installed) on a busy background. The timed call is the Read Text node itself (tensor to array,
detection, direction, recognition, JSON). One warm-up run (engine build, ONNX Runtime session set-up) is
excluded; the figure is the median over the timed runs, per image.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LINES = [("BLUE NOTE JAZZ", 96), ("FRIDAY 9 PM", 64), ("Live at the Letterpress Club", 44),
         ("Tickets 12 EUR at the door", 36), ("doors open 8:30, no dress code", 28)]
CJK_LINE = ("\u7235\u58eb\u4e4b\u591c \u6b22\u8fce\u5149\u4e34", 56)


def font(patterns):
    for p in patterns:
        hits = sorted(glob.glob(p, recursive=True))
        if hits:
            return hits[0]
    return None


def poster(size: int = 1024, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (238, 228, 208))
    d = ImageDraw.Draw(img)
    for _ in range(120):
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        r = int(rng.integers(10, 120))
        d.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(150, 255, 3)))
    for x in range(-size, size, 18):
        d.line([(x, 0), (x + size, size)], fill=(200, 178, 150), width=2)
    latin = font(["/usr/share/fonts/truetype/dejavu/DejaVuSerif-Bold.ttf", "/usr/share/fonts/**/*Serif*Bold*.ttf",
                  "/usr/share/fonts/**/*.ttf"])
    cjk = font(["/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "/usr/share/fonts/**/*CJK*",
                "/usr/share/fonts/**/wqy*"])
    lines = LINES + ([CJK_LINE] if cjk else [])
    y = 90
    for text, px in lines:
        f = ImageFont.truetype(cjk if text == CJK_LINE[0] else latin, px)
        w = d.textlength(text, font=f)
        d.text(((size - w) / 2, y), text, font=f, fill=(150, 20, 20) if px >= 64 else (30, 25, 25))
        y += int(px * 1.9)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="images per Read Text call (the figure stays per image)")
    args = ap.parse_args(argv)

    from letterpress.nodes.text_check import LetterpressTextRead

    images = poster().repeat(args.batch, 1, 1, 1)
    node = LetterpressTextRead()
    results, _, text = node.run(images, 0.5)  # warm-up: engine build and first inference
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        node.run(images, 0.5)
        times.append((time.perf_counter() - t0) / args.batch)
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("rapidocr", "onnxruntime"))
    print(f"read back: {text.replace(chr(10), ' | ')}")
    print(f"Read Text, PP-OCR ({versions}), CPU, {os.cpu_count()} cores: "
          f"{statistics.median(times):.2f} s per 1024x1024 image (median of {args.runs}, min {min(times):.2f} s, "
          f"batch {args.batch})")


if __name__ == "__main__":
    main()
