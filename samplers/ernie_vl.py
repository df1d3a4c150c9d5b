"""ERNIE-4.5-VL: images + prompt -> answer and reasoning; grounding (boxes) parsing and drawing.

Prompts follow the model's chat template: the images come first in the user turn ("Picture N:" + image
placeholder each), then the text; `enable_thinking` selects between an open "<think>" (the model reasons,
closes with "</think>", then answers) and an empty think block (the model answers at once).

Grounding: ERNIE-4.5-VL's tokenizer has a coordinate vocabulary <|LOC_0|> .. <|LOC_1000|> (1001 tokens, with
<|LOC_BEGIN|>, <|LOC_END|>, <|LOC_SEP|>), i.e. positions are normalised to 0..1000 of the image's width and
height. Boxes are accepted in that token form and in the JSON / plain-list forms the model writes when asked for
JSON ({"label", "bbox_2d": [x1, y1, x2, y2]}), always read on the 0..1000 scale and converted to pixels of the
input image.
"""

from __future__ import annotations

import colorsys
import json
import math
import re

import numpy as np
import torch
from PIL import Image

from ..loaders.errors import LetterpressError

from ..loaders.handle import ModelHandle
from . import ernie_vl_video
from .generate import generate, sampling_args
from .images import to_pil  # noqa: F401  (the IMAGE -> PIL rule every ERNIE-VL path shares)

PRESETS = {
    "free question": "",
    "describe as text-to-image prompt": (
        "Describe this image as a prompt for a text-to-image model: one detailed paragraph covering the subject, "
        "composition, style, lighting, colours and any visible text (quoted exactly). Output only the prompt."
    ),
    "read the text in the image": (
        "Read all the text in this image, in reading order, and output it exactly as written. Output only the text."
    ),
}
PRESET_NAMES = list(PRESETS)
GROUNDING_PROMPT = (
    "Locate every instance of the following objects in the image: {objects}. Output a JSON list with one entry "
    "per instance, each {{\"label\": <object name>, \"bbox_2d\": [x1, y1, x2, y2]}}, with coordinates normalised "
    "to 0-1000 of the image width and height. Output only the JSON."
)
COORD_SCALE = 1000.0
MAX_ASPECT = 200  # the image processor refuses images more elongated than this
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# images -----------------------------------------------------------------------------------------------
def check_aspect(images: list[Image.Image]) -> None:
    for k, img in enumerate(images):
        w, h = img.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise LetterpressError(
                f"Image {k + 1} is {w}x{h} pixels, too narrow for ERNIE-VL: its image processor takes aspect ratios "
                f"up to {MAX_ASPECT}:1. Crop it or pad it to a less elongated shape."
            )


def compose_prompt(preset: str, prompt: str) -> str:
    if preset not in PRESETS:
        raise LetterpressError(f"Unknown preset '{preset}' (choices: {', '.join(PRESET_NAMES)}).")
    instruction, extra = PRESETS[preset], prompt.strip()
    if not instruction and not extra:
        raise LetterpressError("The prompt is empty: write a question, or choose a preset.")
    return f"{instruction}\n{extra}" if instruction and extra else (instruction or extra)


def messages(n_images: int, text: str, system_prompt: str = "", n_videos: int = 0) -> list[dict]:
    """The conversation: the pictures, then the videos, then the text, in one user turn."""
    out = []
    if system_prompt.strip():
        out.append({"role": "system", "content": system_prompt.strip()})
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
    content += [{"type": "text", "text": text}]
    out.append({"role": "user", "content": content})
    return out


def prepare_inputs(handle: ModelHandle, images: list[Image.Image], text: str, system_prompt: str, thinking: bool,
                   video=None):
    """Model inputs; `video` (samplers/ernie_vl_video.Clip) goes after the pictures."""
    processor = handle.extras["processor"]
    rendered = processor.tokenizer.apply_chat_template(
        messages(len(images), text, system_prompt, 0 if video is None else 1), chat_template=processor.chat_template,
        tokenize=False, add_generation_prompt=True, enable_thinking=bool(thinking),
    )
    if video is not None:
        return ernie_vl_video.prepare_inputs(handle, images, video, rendered)
    inputs = processor(text=[rendered], images=images, return_tensors="pt")
    inputs = {k: v.to(handle.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(handle.dtype)
    return inputs


# decoding ---------------------------------------------------------------------------------------------
def _control_ids(tokenizer) -> set[int]:
    """Tokens that are framing, not content: BOS/EOS/PAD, image and video markers, the think tags."""
    names = [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, THINK_OPEN, THINK_CLOSE]
    names += [getattr(tokenizer, a, None) for a in ("image_token", "image_start_token", "image_end_token",
                                                    "video_token", "video_start_token", "video_end_token")]
    vocab = tokenizer.get_vocab()
    return {vocab[n] for n in names if n and n in vocab}


def decode(tokenizer, ids: list[int]) -> str:
    """Text of `ids` without framing tokens; other special tokens (e.g. <|LOC_n|> coordinates) are kept."""
    drop = _control_ids(tokenizer)
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


def split_thinking(tokenizer, ids: list[int], thinking: bool) -> tuple[str, str]:
    """(answer, reasoning) of generated ids. The reasoning is what precedes </think>; without a </think>
    everything is the answer when thinking is off, and unfinished reasoning when it is on."""
    ids = [int(i) for i in ids]
    vocab = tokenizer.get_vocab()
    close = vocab.get(THINK_CLOSE)
    if close is not None and close in ids:
        k = ids.index(close)
        return decode(tokenizer, ids[k + 1:]), decode(tokenizer, ids[:k])
    text = decode(tokenizer, ids)
    if THINK_CLOSE in text:  # a tokenizer that spells </think> with several tokens
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return answer.strip(), reasoning.replace(THINK_OPEN, "").strip()
    return ("", text) if thinking else (text, "")


@torch.no_grad()
def vl_generate(handle: ModelHandle, images: torch.Tensor | None, text: str, system_prompt: str, thinking: bool,
                max_new_tokens: int, temperature: float, top_p: float, seed: int, video=None) -> tuple[str, str]:
    """One answer to `text` about all the images of the batch (None: none) and the video clip, if given (a
    samplers/ernie_vl_video.Clip); returns (answer, reasoning)."""
    pil = [] if images is None else to_pil(images)
    check_aspect(pil)
    if video is not None:
        ernie_vl_video.check_size(video, MAX_ASPECT)
    inputs = prepare_inputs(handle, pil, text, system_prompt, thinking, video)
    tok = handle.extras["processor"].tokenizer
    out = generate(handle.module, seed, max_new_tokens, **inputs, **sampling_args(temperature, top_p),
                   pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(handle.module, tok))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return split_thinking(tok, new, thinking)


# grounding --------------------------------------------------------------------------------------------
_LOC = re.compile(r"<\|LOC_(\d+)\|>")
_LOC_RUN = re.compile(r"(?:<\|LOC_BEGIN\|>)?((?:\s*<\|LOC_\d+\|>\s*(?:<\|LOC_SEP\|>)?){4,})(?:<\|LOC_END\|>)?")
_LIST4 = re.compile(r"[\[\(]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\]\)]?\s*,?\s*[\[\(]?\s*"
                    r"(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\]\)]")
_LABEL_KEYS = ("label", "name", "object", "category", "text")
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d", "coordinates")
_CONTAINERS = ("objects", "boxes", "results", "detections", "items", "annotations", "data", "instances")


def stop_ids(module, tok) -> list[int]:
    """The checkpoint's own stop tokens (generation_config, as transformers' generate() uses them) plus the
    tokenizer's end of text."""
    ids = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids + [t for t in [tok.eos_token_id] if t is not None and t not in ids]


def object_names(objects: str) -> list[str]:
    """The objects to find, as the user wrote them: separated by commas, semicolons or lines."""
    names = [o.strip() for o in re.split(r"[,\n;]", objects) if o.strip()]
    if not names:
        raise LetterpressError("Name at least one object to find (comma-separated, e.g. 'cat, red sign').")
    return names


def grounding_prompt(objects: str) -> str:
    return GROUNDING_PROMPT.format(objects=", ".join(object_names(objects)))


def _clean_label(text: str) -> str:
    text = re.sub(r"<\|[^|]*\|>", " ", text)  # leftover markers such as <|TEXT_START|>
    text = re.sub(r"[\[\]{}\"'`:,]", " ", text)
    words = text.split()
    return " ".join(words[-6:]) if words else ""


def _as_box(value) -> list[float] | None:
    """[x1, y1, x2, y2] or [[x1, y1], [x2, y2]] as four floats, else None."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(p, list) and len(p) == 2 for p in value):
        value = value[0] + value[1]
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in value):
        return [float(v) for v in value]
    return None


def _json_boxes(value, label: str = "") -> list[tuple[str, list[float]]]:
    """Every box in a decoded JSON answer, however nested: {"label", "bbox_2d"} items (any of the usual key
    names), and boxes listed under an object's name ({"cat": [[...], [...]]}, {"cat": {"bbox_2d": ...}}); a box
    without a label of its own takes the name of the key it is under."""
    if _as_box(value) is not None:
        return [(label, _as_box(value))]
    if isinstance(value, list):
        return [found for item in value for found in _json_boxes(item, label)]
    if not isinstance(value, dict):
        return []
    own = next((str(value[k]) for k in _LABEL_KEYS if isinstance(value.get(k), (str, int, float))), label)
    box = next((_as_box(value[k]) for k in _BOX_KEYS if k in value), None)
    if box is not None:
        return [(own, box)]
    return [found for k, v in value.items() if k not in _LABEL_KEYS
            for found in _json_boxes(v, own if own != label else (label if k.lower() in _CONTAINERS else k))]


def _from_json(text: str) -> list[tuple[str, list[float]]]:
    found = []
    body = re.sub(r"```(?:json)?", "", text)
    decoder = json.JSONDecoder()
    i = 0
    while i < len(body):
        if body[i] not in "[{":
            i += 1
            continue
        try:
            value, end = decoder.raw_decode(body, i)
        except ValueError:
            i += 1
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):  # bare lists of numbers are left to the plain-text reading, with its labels
                found += _json_boxes(item)
        i = end
    return found


def _from_loc_tokens(text: str) -> list[tuple[str, list[float]]]:
    found, last = [], 0
    for m in _LOC_RUN.finditer(text):
        values = [float(v) for v in _LOC.findall(m.group(1))]
        if len(values) >= 8:  # a 4-point polygon: its bounding rectangle
            xs, ys = values[0:8:2], values[1:8:2]
            values = [min(xs), min(ys), max(xs), max(ys)]
        found.append((_clean_label(text[last:m.start()]), values[:4]))
        last = m.end()
    return found


def _from_plain(text: str) -> list[tuple[str, list[float]]]:
    found, last = [], 0
    for m in _LIST4.finditer(text):
        found.append((_clean_label(text[last:m.start()]), [float(m.group(i)) for i in range(1, 5)]))
        last = m.end()
    return found


def parse_boxes(text: str, width: int, height: int, labels: list[str] | None = None, image: int = 0,
                dropped: list | None = None) -> list[dict]:
    """Boxes in `text` (model output) as dicts {image, label, box (pixels x1,y1,x2,y2), box_1000}, clamped to the
    image. Boxes wholly outside it (0..1000) are left out, and added to `dropped` if given; a point or a line (a
    tiny object) is kept."""
    raw = _from_loc_tokens(text) or _from_json(text) or _from_plain(text)
    labels = labels or []
    boxes = []
    for n, (label, (x1, y1, x2, y2)) in enumerate(raw):
        norm = [min(max(v, 0.0), COORD_SCALE) for v in (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))]
        px = [norm[0] * width / COORD_SCALE, norm[1] * height / COORD_SCALE,
              norm[2] * width / COORD_SCALE, norm[3] * height / COORD_SCALE]
        if not label:
            label = labels[n] if n < len(labels) else (labels[0] if len(labels) == 1 else "object")
        if max(x1, x2) <= 0 or min(x1, x2) >= COORD_SCALE or max(y1, y2) <= 0 or min(y1, y2) >= COORD_SCALE:
            if dropped is not None:
                dropped.append({"image": image, "label": label, "box_1000": [x1, y1, x2, y2],
                                "reason": "outside the image (coordinates 0..1000)"})
            continue
        boxes.append({"image": image, "label": label, "box": [round(v, 2) for v in px],
                      "box_1000": [round(v, 2) for v in norm]})
    return boxes


NO_BOXES_NOTE = (
    "No boxes in the answer. If it came from a server (Remote Generate), the server may have dropped ERNIE's "
    "<|LOC_n|> coordinate tokens: servers decode with special tokens skipped unless asked otherwise. Remote Generate "
    "asks for skip_special_tokens=false (vLLM and SGLang honour it; transformers serve refuses the field, so its "
    "answers never carry them): serve with vLLM or SGLang, or ask for JSON boxes (bbox_2d numbers) in the prompt.")


def boxes_json(boxes: list[dict], width: int, height: int, dropped: list | None = None, note: str = "") -> str:
    data = {"width": width, "height": height, "coordinates": "pixels x1, y1, x2, y2 (top-left origin)", "boxes": boxes}
    if dropped:
        data["dropped"] = dropped
    if note:
        data["note"] = note
    return json.dumps(data, ensure_ascii=False)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_boxes(boxes: str, width: int | None = None, height: int | None = None) -> list[dict]:
    """The boxes of a boxes JSON; given the size of the images they are drawn on, boxes found on images of
    another size (the JSON's width and height) are scaled to it."""
    try:
        data = json.loads(boxes)
    except ValueError as e:
        raise LetterpressError(f"The boxes input is not JSON ({e}); wire the boxes output of ERNIE-VL Ground.")
    items = data.get("boxes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise LetterpressError("The boxes JSON needs a 'boxes' list (as ERNIE-VL Ground writes it).")
    for n, b in enumerate(items, 1):
        if not isinstance(b, dict) or not isinstance(b.get("box"), list) or len(b["box"]) != 4:
            raise LetterpressError(f"Box {b!r} has no 'box': [x1, y1, x2, y2] in pixels.")
        if not all(_is_number(v) for v in b["box"]):
            raise LetterpressError(f"Box {n} ({b!r:.100}): 'box' must be four numbers [x1, y1, x2, y2] in pixels, "
                                   f"got {b['box']!r}.")
        k = b.get("image", 0)
        if not isinstance(k, int) or isinstance(k, bool):
            raise LetterpressError(f"Box {n} ({b!r:.100}): 'image' must be the image's index in the batch "
                                   f"(0, 1, ...), got {k!r}.")
    found_w, found_h = (data.get("width"), data.get("height")) if isinstance(data, dict) else (None, None)
    if width and height and _is_number(found_w) and _is_number(found_h) and found_w > 0 and found_h > 0 \
            and (found_w, found_h) != (width, height):
        sx, sy = width / found_w, height / found_h
        items = [{**b, "box": [b["box"][0] * sx, b["box"][1] * sy, b["box"][2] * sx, b["box"][3] * sy]} for b in items]
    return items


def _color(label: str) -> tuple[int, int, int]:
    h = (sum(ord(c) * 31 ** i for i, c in enumerate(label)) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(images: torch.Tensor, boxes: list[dict], line_width: int = 3, show_labels: bool = True,
               color: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The images with each box outlined (inside its pixel rectangle) and labelled; box 'image' picks the image."""
    from PIL import ImageDraw

    pil = to_pil(images)
    for b in boxes:
        k = int(b.get("image", 0))
        if not 0 <= k < len(pil):
            continue
        draw = ImageDraw.Draw(pil[k])
        x1, x2 = sorted((round(b["box"][0]), round(b["box"][2])))
        y1, y2 = sorted((round(b["box"][1]), round(b["box"][3])))
        c = color or _color(str(b.get("label", "")))
        # x2, y2 are exclusive; a box under 1 px (or swapped corners) still gets one pixel
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=c, width=line_width)
        if show_labels and b.get("label"):
            tx, ty = x1 + line_width + 1, y1 + line_width + 1
            draw.text((tx, ty), str(b["label"]), fill=c)
    out = torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pil]))
    return out.to(images.dtype)
