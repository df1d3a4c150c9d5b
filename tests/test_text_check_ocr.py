"""Read Text on the real PP-OCR engine (rapidocr): text rendered with Pillow at several sizes, rotations and
on busy backgrounds must come back; Best of Batch must keep the correctly spelled candidate; the shipped
best-of-4 workflow runs headless on the tiny ERNIE-Image model."""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.runner import Runner, load_workflow, set_values
from letterpress.samplers.text_metrics import words

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the PP-OCR engine is not installed: pip install rapidocr onnxruntime (or the 'ocr' extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATIN_FONTS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
               "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"]
CJK_FONTS = ["/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
             "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
             "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"]


def first_font(candidates, pattern=None):
    for path in candidates + (sorted(glob.glob(pattern, recursive=True)) if pattern else []):
        if os.path.exists(path):
            return path
    return None


def latin_font():
    path = first_font(LATIN_FONTS, "/usr/share/fonts/**/*Sans*Bold*.ttf")
    if path is None:
        pytest.skip("no TrueType sans font found (apt-get install fonts-dejavu-core)")
    return path


def render(text, size, angle=0.0, busy=False, font=None, canvas=None, seed=0):
    """Dark text (rotated by `angle` degrees) centred on a plain or busy background, as an IMAGE tensor."""
    f = ImageFont.truetype(font or latin_font(), size)
    left, top, right, bottom = f.getbbox(text)
    pad = size // 2
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=f, fill=(25, 20, 20, 255))
    layer = layer.rotate(angle, expand=True, resample=Image.BICUBIC)
    w, h = canvas or (max(layer.width + 40, 320), max(layer.height + 40, 320))
    rng = np.random.default_rng(seed)
    if busy:  # coloured blobs and diagonal stripes behind the text
        bg = Image.new("RGB", (w, h), (236, 226, 205))
        d = ImageDraw.Draw(bg)
        for _ in range(50):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.ellipse([x, y, x + int(rng.integers(10, 70)), y + int(rng.integers(10, 70))],
                      fill=tuple(int(v) for v in rng.integers(140, 255, 3)))
        for x in range(-h, w, 14):
            d.line([(x, 0), (x + h, h)], fill=(190, 165, 140), width=2)
    else:
        bg = Image.new("RGB", (w, h), (255, 255, 255))
    bg.paste(layer, ((w - layer.width) // 2, (h - layer.height) // 2), layer)
    return torch.from_numpy(np.asarray(bg).astype(np.float32) / 255.0)[None]


def read(images):
    results, js, text = N["LetterpressTextRead"]().run(images, 0.5)
    return results, js, text


def read_words(result):
    return [w for line in result["lines"] for w in words(line["text"])]


CASES = [  # text, size in pixels, rotation in degrees, busy background
    ("HELLO WORLD", 18, 0, False),
    ("HELLO WORLD", 44, 0, False),
    ("POSTER", 110, 0, False),
    ("GRAND OPENING", 36, 8, False),
    ("GRAND OPENING", 36, -15, False),
    ("LETTERPRESS", 36, 90, False),
    ("SUMMER SALE 2025", 36, 180, False),
    ("FRESH COFFEE", 40, 0, True),
    ("JAZZ NIGHT", 34, 6, True),
]


@pytest.mark.parametrize("text,size,angle,busy", CASES, ids=[f"{t}-{s}px-{a}deg{'-busy' if b else ''}"
                                                             for t, s, a, b in CASES])
def test_reads_rendered_latin_text(text, size, angle, busy):
    image = render(text, size, angle, busy, seed=size)
    results, js, plain = read(image)
    assert len(results) == 1 and results[0]["engine"] == "PP-OCR (rapidocr)"
    assert results[0]["width"] == image.shape[2] and results[0]["height"] == image.shape[1]
    assert read_words(results[0]) == words(text), plain
    for line in results[0]["lines"]:  # every box lies inside the image
        assert len(line["box"]) == 4 and 0 < line["score"] <= 1
        for x, y in line["box"]:
            assert -2 <= x <= image.shape[2] + 2 and -2 <= y <= image.shape[1] + 2


def test_reads_rendered_chinese_text():
    font = first_font(CJK_FONTS, "/usr/share/fonts/**/*CJK*")
    if font is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    plain_img = render("\u65b0\u5e74\u5feb\u4e50", 44, font=font)
    busy_img = render("\u6b22\u8fce\u5149\u4e34 \u5496\u5561\u5e97", 38, 5, True, font=font, seed=3)
    results, _, text = read(plain_img)
    assert read_words(results[0]) == list("\u65b0\u5e74\u5feb\u4e50"), text
    results, _, text = read(busy_img)
    assert read_words(results[0]) == list("\u6b22\u8fce\u5149\u4e34\u5496\u5561\u5e97"), text


def test_batch_output_formats():
    batch = torch.cat([render("ONE", 40, canvas=(320, 320)), render("TWO WORDS", 40, canvas=(320, 320))])
    results, js, text = read(batch)
    assert [read_words(r) for r in results] == [["one"], ["two", "words"]]
    import json

    assert json.loads(js) == results
    assert text == "[image 0]\nONE\n\n[image 1]\nTWO WORDS"


def test_best_of_batch_keeps_the_correctly_spelled_candidate():
    prompt = 'a cafe chalkboard that says "FRESH COFFEE" and \u201cOPEN DAILY\u201d'
    candidates = [("FRESH COFEE", "OPEN DAILY"), ("FRESH COFFEE", "OPEN DALY"), ("FRESH COFFEE", "OPEN DAILY"),
                  ("FRESH TOFFEE", "OPEN DAILY")]
    font = latin_font()
    images = []
    for i, (a, b) in enumerate(candidates):
        img = Image.new("RGB", (384, 384), (250, 246, 236))
        d = ImageDraw.Draw(img)
        f = ImageFont.truetype(font, 38)
        d.text((30, 110), a, font=f, fill=(30, 30, 30))
        d.text((30, 210), b, font=f, fill=(160, 30, 30))
        images.append(torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0))
    batch = torch.stack(images)
    results, _, _ = read(batch)
    scores, report, _ = N["LetterpressTextAccuracy"]().run(results, prompt, "", False)
    assert [v[0] for v in scores["values"]][2] == 1.0
    assert all(v[0] < 1.0 for i, v in enumerate(scores["values"]) if i != 2), report
    best, index, ranking = N["LetterpressTextBestOfBatch"]().run(batch, scores, "word_accuracy")
    assert index == 2 and torch.equal(best, batch[2:3]) and ranking.startswith("1. image 2:")
    assert "'coffee' read as 'cofee'" in report and "'daily' read as 'daly'" in report


def test_best_of_4_workflow_runs_headless(ernie, host):
    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "text_best_of_4_api.json"))
    wf = set_values(wf, ["width=32", "height=32", "steps=2"])
    out = Runner().run(wf)
    results = out["results"]
    images = results["6"][0]
    assert images.shape[0] == 4
    read_text = results["7"][0]
    assert len(read_text) == 4 and all(r["engine"] == "PP-OCR (rapidocr)" for r in read_text)
    scores = results["8"][0]
    assert len(scores["values"]) == 4 and scores["expected"] == ["BLUE NOTE JAZZ", "FRIDAY 9 PM"]
    best, index, ranking = results["9"]
    expected_best = max(range(4), key=lambda i: (scores["values"][i][0], scores["values"][i][1], -i))
    assert index == expected_best and torch.equal(best, images[index:index + 1])
    assert len(ranking.splitlines()) == 4
    saved = out["outputs"]["10"]["images"]
    assert len(saved) == 1 and Image.open(saved[0]["path"]).size == (32, 32)
