"""Reading text back from images: the engines behind the Read Text node.

- PP-OCR through the `rapidocr` package (ONNX Runtime on the CPU). Its detection, direction and
  recognition models (Chinese and English) ship inside the wheel; they are loaded from there by explicit
  path, so nothing is ever downloaded at run time.
- A vision-language model, when one is wired in: slower, better on stylised text. It is the registered family
  whose SPEC has a text_reader (loaders/families.py), and lives in its samplers/<key>.py; this module only calls
  into it.

Every engine returns, per image, a dict {"engine", "width", "height", "lines": [{"text", "score", "box"}]}
with boxes as four [x, y] corners in pixels of that image, lines in reading order (top to bottom, then
left to right). The VL engine gives no confidence (score None) and no box when its answer has none. A missing engine package is an error that names what to install; there is never a silent
fallback to another engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading

import numpy as np
import torch

from ..loaders import families
from ..loaders.errors import LetterpressError

from ..loaders.host import get_host
from .images import check_image

PP_OCR = "PP-OCR (rapidocr)"
INSTALL_OCR = "pip install rapidocr onnxruntime  (or: pip install -e \".[ocr]\" in the Letterpress folder)"

_engine = None
_engine_lock = threading.Lock()


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE (B,H,W,C float 0..1) -> RGB uint8 arrays."""
    images = check_image(images, "Read Text")
    arr = (images.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [np.ascontiguousarray(a) for a in arr]


def _rapidocr_models(package_dir: str) -> dict[str, str]:
    """The model files shipped in the rapidocr wheel, by task (det, cls, rec)."""
    folder = os.path.join(package_dir, "models")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = {}
    for task in ("det", "cls", "rec"):
        hits = [f for f in files if f.endswith(".onnx") and f"_{task}" in f]
        if len(hits) != 1:
            raise LetterpressError(
                f"The installed rapidocr has no single bundled {task} model in {folder} (found {hits or 'none'}); "
                f"Letterpress uses only the models inside the wheel and never downloads. Reinstall it: {INSTALL_OCR}")
        found[task] = os.path.join(folder, hits[0])
    return found


def rapidocr_engine():
    """One shared PP-OCR engine, built on first use from the models inside the rapidocr wheel."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            return _engine
        missing = [m for m in ("rapidocr", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise LetterpressError(f"Read Text's PP-OCR engine needs the package(s) {', '.join(missing)}, "
                                   f"which are not installed. Install them: {INSTALL_OCR}")
        import rapidocr

        paths = _rapidocr_models(os.path.dirname(rapidocr.__file__))
        params = {"Global.log_level": "error", "Det.model_path": paths["det"], "Cls.model_path": paths["cls"],
                  "Rec.model_path": paths["rec"]}
        _engine = rapidocr.RapidOCR(params=params)
        return _engine


def read_pp_ocr(images: torch.Tensor, min_score: float = 0.5) -> list[dict]:
    """PP-OCR on every image of the batch."""
    arrays = to_uint8(images)
    engine = rapidocr_engine()
    host = get_host()
    out = []
    for rgb in arrays:
        host.check_interrupt()
        h, w = rgb.shape[:2]
        result = engine(np.ascontiguousarray(rgb[..., ::-1]), text_score=min_score)  # rapidocr takes BGR arrays
        lines = []
        if getattr(result, "txts", None):
            for text, score, box in zip(result.txts, result.scores, result.boxes):
                lines.append({"text": str(text), "score": round(float(score), 4),
                              "box": [[round(float(x), 1), round(float(y), 1)] for x, y in np.asarray(box).tolist()]})
        out.append({"engine": PP_OCR, "width": w, "height": h, "lines": _reading_order(lines)})
    return out


def _reading_order(lines: list[dict]) -> list[dict]:
    """Top to bottom; lines whose vertical centres are within half a line height count as one row."""
    def top(line):
        return min(p[1] for p in line["box"])

    def height(line):
        ys = [p[1] for p in line["box"]]
        return max(ys) - min(ys)

    rows: list[list[dict]] = []
    for line in sorted(lines, key=top):
        if rows:
            ref = rows[-1][0]
            c_ref = top(ref) + height(ref) / 2
            c = top(line) + height(line) / 2
            if abs(c - c_ref) < max(height(ref), height(line)) / 2:
                rows[-1].append(line)
                continue
        rows.append([line])
    return [line for row in rows for line in sorted(row, key=lambda ln: min(p[0] for p in ln["box"]))]


VL_READ_PROMPT = (
    "Read all the text in this image. Output a JSON list with one entry per line of text, in reading order, each "
    "{\"text\": <the line exactly as written>, \"bbox_2d\": [x1, y1, x2, y2]}, with coordinates normalised to 0-1000 "
    "of the image width and height. Output only the JSON."
)
VL_MAX_NEW_TOKENS = 1024


def _reader() -> families.FamilySpec:
    reader = families.text_reader()
    if reader is None:
        raise LetterpressError("No model family of this version of Letterpress reads text: disconnect vl_model to read "
                               "with PP-OCR.")
    return reader


def _vl_module():
    """samplers/<key>.py of the text-reading family with the two functions this engine uses, or a clear 'not
    available' error."""
    reader = _reader()
    try:
        vl = importlib.import_module(f".{reader.key}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(reader.key):
            raise LetterpressError(f"The {reader.title} engine of Read Text is not available in this version of "
                                   f"Letterpress (samplers/{reader.key}.py is missing). Disconnect vl_model to read "
                                   "with PP-OCR.") from None
        raise
    missing = [f for f in ("vl_generate", "parse_boxes") if not hasattr(vl, f)]
    if missing:
        raise LetterpressError(f"The {reader.title} engine of Read Text is not available: samplers/{reader.key}.py "
                               f"lacks {', '.join(missing)}. Disconnect vl_model to read with PP-OCR.")
    return vl


def vl_lines(answer: str, width: int, height: int, parse_boxes) -> list[dict]:
    """Lines from the VL model's answer: the JSON entries with their boxes when it wrote them, else its plain
    lines without boxes. Boxes become four corners in pixels, like PP-OCR's; the VL model gives no confidence."""
    lines = []
    for b in parse_boxes(answer, width, height) if "bbox" in answer or "box" in answer or "LOC_" in answer else []:
        x1, y1, x2, y2 = b["box"]
        if b.get("label", "").strip():
            lines.append({"text": b["label"].strip(), "score": None, "box": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]})
    if lines:
        return _reading_order(lines)
    body = answer.replace("```json", "").replace("```", "")
    return [{"text": ln.strip(), "score": None, "box": None} for ln in body.splitlines() if ln.strip()]


def read_vl(images: torch.Tensor, vl_model) -> list[dict]:
    """Reading with the text-reading family's model (greedy, no thinking), one image at a time, through its
    samplers/<key>.py."""
    vl, engine = _vl_module(), _reader().title
    arrays = to_uint8(images)
    host = get_host()
    host.load(vl_model)
    out = []
    for i, rgb in enumerate(arrays):
        host.check_interrupt()
        h, w = rgb.shape[:2]
        answer, _ = vl.vl_generate(vl_model, images[i:i + 1], VL_READ_PROMPT, "", False, VL_MAX_NEW_TOKENS,
                                   0.0, 1.0, 0)
        out.append({"engine": engine, "width": w, "height": h, "lines": vl_lines(answer, w, h, vl.parse_boxes)})
    return out


def read_text(images: torch.Tensor, vl_model=None, min_score: float = 0.5) -> list[dict]:
    """Read every image of the batch: with the vision-language model when one is given, else with PP-OCR."""
    if vl_model is not None:
        return read_vl(images, vl_model)
    return read_pp_ocr(images, min_score)


def plain_text(results: list[dict]) -> str:
    """The read text as plain lines; with several images, each under an [image N] header."""
    if len(results) == 1:
        return "\n".join(ln["text"] for ln in results[0]["lines"])
    blocks = []
    for i, r in enumerate(results):
        blocks.append(f"[image {i}]\n" + "\n".join(ln["text"] for ln in r["lines"]))
    return "\n\n".join(blocks)
