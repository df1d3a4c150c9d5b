"""ERNIE-4.5-VL Thinking: "think with images". The model reasons, calls the image zoom tool on a region of the
picture, gets the crop back as a new picture inside the tool result, and reasons on; this module parses its tool
calls, crops, and runs that loop locally (transformers' generate(), per-token progress and Cancel) or through an
OpenAI-compatible server (samplers/remote_openai.py).

Tool calls (vLLM's `ernie45` and FastDeploy's `ernie-45-vl-thinking` parsers read them the same way): after the
reasoning's `</think>` come one or more blocks `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
Following FastDeploy, text other than white space between `</think>` and the first `<tool_call>` means the model
answered rather than called, and a call whose JSON is cut off or invalid is no call at all (the whole output is
then the answer); a last block whose closing tag was cut off but whose JSON is complete still counts.

The conversation with tools (the tool list, the assistant's calls, the tool results with the crop as a picture)
is laid out by the checkpoint's own chat template, never by the pack: the messages go to `apply_chat_template`
in the OpenAI shape (`tools=`, assistant `tool_calls`, role "tool" whose content holds the crop as an image).
A template that drops tools or tool messages (transformers' converted ERNIE-4.5-VL template does) is refused
with a clear error rather than silently losing the crop. The original release's template writes images as
`<|image@placeholder|>`; that marker is read as the processor's image token.

The zoom tool (`image_zoom_in_tool`, FastDeploy's ERNIE-4.5-VL-Thinking guide): `bbox_2d` [x1, y1, x2, y2] on the
0..1000 scale of the original picture (the same space the Thinking model grounds objects in), optional `label`.
Coordinates are clamped to the picture, reversed corners swapped, and a region smaller than one merged vision
token (patch 14 x merge 2 = 28 px a side) is grown around its centre to that size.

Image search (`image_search`) needs a search service; the pack offers no such tool and makes no network call of
its own: only the zoom tool is declared.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image

from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle
from . import ernie_vl_remote as remote
from . import remote_openai
from .ernie_vl import COORD_SCALE, MAX_ASPECT, THINK_CLOSE, THINK_OPEN, check_aspect, stop_ids, to_pil
from .generate import generate, sampling_args

ZOOM = "image_zoom_in_tool"
ZOOM_MIN_SIDE = 28  # one merged vision token: patch 14 x merge 2 (the processor's own values are used locally)
ZOOM_TOOL = {"type": "function", "function": {
    "name": ZOOM,
    "description": "Zoom in on a region of the image: crops the region given by a bounding box (and an optional "
                   "label of the object in it) and returns the crop as a new picture.",
    "parameters": {"type": "object", "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "The region as [x1, y1, x2, y2]: top-left and bottom-right corners, in coordinates "
                                   "normalised to 0-1000 of the original image's width and height."},
        "label": {"type": "string", "description": "The name of the object in the region (optional)."},
    }, "required": ["bbox_2d"]},
}}
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# the original release's image / video markers, read as the processor's own tokens
ORIGINAL_MARKERS = {"<|image@placeholder|>": "image_token", "<|video@placeholder|>": "video_token"}


# parsing --------------------------------------------------------------------------------------------------
def _call_from_json(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
        return None
    args = data["arguments"]
    if isinstance(args, str):  # arguments as a JSON string, as the OpenAI API carries them
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    return {"name": data["name"], "arguments": args} if isinstance(args, dict) else None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(answer, calls) of the part of a Thinking model's output after its reasoning. No valid call (no block,
    words before the first block, JSON cut off or invalid): ([the text], []). Valid calls: (text before the
    first block, [{"name", "arguments"}, ...])."""
    start = text.find(CALL_OPEN)
    if start == -1:
        return text.strip(), []
    before = text[:start]
    if THINK_CLOSE in before and before.split(THINK_CLOSE)[-1].strip():
        return text.strip(), []  # FastDeploy: only white space may stand between </think> and <tool_call>
    calls, rest = [], text[start:]
    while rest.startswith(CALL_OPEN):
        end = rest.find(CALL_CLOSE)
        body = rest[len(CALL_OPEN):end if end != -1 else len(rest)]
        call = _call_from_json(body.strip())
        if call is None:
            return text.strip(), []
        calls.append(call)
        rest = "" if end == -1 else rest[end + len(CALL_CLOSE):].lstrip()
    return before.strip(), calls


def split_turn(text: str) -> tuple[str, str, list[dict]]:
    """(reasoning, answer, calls) of one turn of a Thinking model (the prompt opened <think>). Reasoning that
    never closed is all reasoning: no answer, no call."""
    if THINK_CLOSE not in text:
        return text.replace(THINK_OPEN, "").strip(), "", []
    reasoning, after = text.split(THINK_CLOSE, 1)
    answer, calls = parse_tool_calls(after)
    return reasoning.replace(THINK_OPEN, "").strip(), answer, calls


# zoom -------------------------------------------------------------------------------------------------------
def zoom_box(bbox, width: int, height: int, min_side: int = 28) -> list[int]:
    """Pixel box [x1, y1, x2, y2] (x2, y2 exclusive) of a 0..1000 box on a width x height picture: corners
    sorted, clamped to the picture, covering every pixel the box touches, at least `min_side` pixels a side
    (grown around its centre, kept inside the picture) and no more elongated than the processor takes."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise LetterpressError(f"bbox_2d must be four numbers [x1, y1, x2, y2] on the 0-1000 scale, got {bbox!r}.")
    x1, x2 = sorted(min(max(float(v), 0.0), COORD_SCALE) for v in (bbox[0], bbox[2]))
    y1, y2 = sorted(min(max(float(v), 0.0), COORD_SCALE) for v in (bbox[1], bbox[3]))
    box = [math.floor(x1 * width / COORD_SCALE), math.floor(y1 * height / COORD_SCALE),
           math.ceil(x2 * width / COORD_SCALE), math.ceil(y2 * height / COORD_SCALE)]
    w, h = box[2] - box[0], box[3] - box[1]
    need_w = min(width, max(min_side, w, math.ceil(h / MAX_ASPECT)))
    need_h = min(height, max(min_side, h, math.ceil(w / MAX_ASPECT)))

    def grow(lo, hi, need, limit):
        extra = need - (hi - lo)
        if extra <= 0:
            return lo, hi
        lo = max(0, lo - extra // 2)
        hi = lo + need
        if hi > limit:
            hi, lo = limit, limit - need
        return lo, hi

    box[0], box[2] = grow(box[0], box[2], need_w, width)
    box[1], box[3] = grow(box[1], box[3], need_h, height)
    return box


def run_zoom(arguments: dict, picture: Image.Image, min_side: int) -> tuple[Image.Image, list[int]]:
    box = zoom_box(arguments.get("bbox_2d"), picture.width, picture.height, min_side)
    return picture.crop(tuple(box)), box


def execute(call: dict, picture: Image.Image, min_side: int) -> dict:
    """A record of one call: its name, arguments, and either the crop (PIL) and its pixel box, or an error text
    the model reads back as the tool's result."""
    record = {"name": call["name"], "arguments": call["arguments"]}
    if call["name"] != ZOOM:
        record["error"] = f"Unknown tool '{call['name']}': the only tool is {ZOOM}."
        return record
    try:
        record["crop"], record["box"] = run_zoom(call["arguments"], picture, min_side)
    except LetterpressError as e:
        record["error"] = str(e)
    return record


def crops_batch(crops: list[Image.Image], picture: Image.Image) -> torch.Tensor:
    """The crops as one IMAGE batch: each in the top-left corner of a canvas as large as the largest crop
    (black elsewhere; the model got each crop alone). No crop: the picture itself (ComfyUI's image previews fail
    on an empty batch)."""
    crops = crops or [picture]
    w, h = max(c.width for c in crops), max(c.height for c in crops)
    out = np.zeros((len(crops), h, w, 3), dtype=np.float32)
    for k, c in enumerate(crops):
        out[k, :c.height, :c.width] = np.asarray(c.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out)


def run_calls(calls: list[dict], run, max_tool_calls: int, records: list[dict], steps: list[str],
              reasoning: str) -> list[dict]:
    """Runs a turn's calls within what is left of max_tool_calls, adds them to `records` and the turn to `steps`;
    returns the calls that ran, or [] when the loop ends (no call, or a call past the limit)."""
    budget = max_tool_calls - len(records)
    done = [run(c) for c in calls[:budget]]
    skipped = [{"name": c["name"], "arguments": c["arguments"], "error": "not run: max_tool_calls reached"}
               for c in calls[budget:]]
    steps.append(describe_step(len(steps) + 1, reasoning, done + skipped))
    records += done + skipped
    return [] if skipped else done


def calls_json(records: list[dict], width: int, height: int) -> str:
    """Every call (name, arguments, pixel box or error) under "calls", and the zoomed regions as boxes JSON
    (pixels of the first picture) under "boxes", which ERNIE-VL Draw Boxes draws."""
    boxes = [{"image": 0, "label": str(r["arguments"].get("label") or f"zoom {k + 1}"), "box": r["box"],
              "box_1000": r["arguments"].get("bbox_2d")} for k, r in enumerate(x for x in records if "crop" in x)]
    return json.dumps({"width": width, "height": height, "coordinates": "pixels x1, y1, x2, y2 (top-left origin)",
                       "boxes": boxes, "calls": [{k: v for k, v in r.items() if k != "crop"} for r in records]},
                      ensure_ascii=False)


def describe_step(step: int, reasoning: str, records: list[dict]) -> str:
    lines = [f"[turn {step}]", reasoning] if reasoning else [f"[turn {step}]"]
    for r in records:
        args = json.dumps(r["arguments"], ensure_ascii=False)
        result = f"-> crop {r['crop'].width}x{r['crop'].height} at pixels {r['box']}" if "crop" in r else \
            f"-> {r.get('error', 'not run: max_tool_calls reached')}"
        lines.append(f"[tool call] {r['name']} {args} {result}")
    return "\n".join(lines)


# conversation -----------------------------------------------------------------------------------------------
def tool_result_content(record: dict, image_part: dict) -> list[dict]:
    return [image_part] if "crop" in record else [{"type": "text", "text": record["error"]}]


def assistant_turn(reasoning: str, answer: str, records: list[dict], ids: list[str] | None = None) -> dict:
    calls = [{"type": "function", "function": {"name": r["name"], "arguments": r["arguments"]}} for r in records]
    if ids:
        for c, i in zip(calls, ids):
            c["id"] = i
    return {"role": "assistant", "content": answer, "reasoning_content": reasoning, "tool_calls": calls}


def _probe(processor) -> None:
    """Refuses a chat template that would drop the tool list or a tool's result."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": ZOOM, "arguments": {"bbox_2d": [0, 0, 1, 1]}}}]},
            {"role": "tool", "content": [{"type": "text", "text": "lp_probe_result"}]}]
    tool = {"type": "function", "function": {"name": "lp_probe_tool", "description": "", "parameters": {}}}
    try:
        text = processor.tokenizer.apply_chat_template(msgs, tools=[tool], chat_template=processor.chat_template,
                                                        tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template error (jinja raises its own types)
        text = f"<error {e}>"
    if "lp_probe_tool" not in text or "lp_probe_result" not in text:
        raise LetterpressError(
            "This ERNIE-VL folder's chat template has no tool calling (it drops the tool list or the tool results, "
            "as the template transformers' conversion writes does). Think with Images needs the Thinking model's "
            "own template: put the chat_template of baidu/ERNIE-4.5-VL-28B-A3B-Thinking's tokenizer_config.json "
            "in the folder's chat_template.jinja.")


def render(processor, msgs: list[dict], tools: list[dict]) -> str:
    """The prompt for `msgs` with `tools`, from the checkpoint's own chat template (thinking on)."""
    _probe(processor)
    text = processor.tokenizer.apply_chat_template(
        msgs, tools=tools, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True,
        enable_thinking=True)
    for marker, attr in ORIGINAL_MARKERS.items():
        token = getattr(processor, attr, None)
        if token:
            text = text.replace(marker, token)
    return text


def user_turn(n_images: int, text: str, system_prompt: str, image_part: dict | None = None) -> list[dict]:
    out = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    parts = [dict(image_part or {"type": "image"}) for _ in range(n_images)]
    return out + [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def min_side(processor) -> int:
    ip = processor.image_processor
    return int(getattr(ip, "patch_size", 14) or 14) * int(getattr(ip, "merge_size", 2) or 2)


def check_loop(max_tool_calls: int) -> None:
    if not isinstance(max_tool_calls, int) or max_tool_calls < 0:
        raise LetterpressError(f"max_tool_calls must be 0 or more, got {max_tool_calls}.")


# the local loop ---------------------------------------------------------------------------------------------
def _turn_text(tok, ids: list[int]) -> str:
    drop = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    return tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)


@torch.no_grad()
def think_with_images(handle: ModelHandle, images: torch.Tensor, text: str, system_prompt: str, max_tool_calls: int,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int):
    """Runs the zoom loop on the local model. Returns (answer, reasoning of every turn with its calls, calls
    JSON, crops IMAGE batch)."""
    check_loop(max_tool_calls)
    processor = handle.processor
    tok = processor.tokenizer
    pictures = to_pil(images)
    check_aspect(pictures)
    side = min_side(processor)
    msgs = user_turn(len(pictures), text, system_prompt)
    crops, records, steps, answer = [], [], [], ""
    sampling = sampling_args(temperature, top_p)
    for _ in range(max_tool_calls + 1):
        prompt = render(processor, msgs, [ZOOM_TOOL])
        inputs = processor(text=[prompt], images=pictures + crops, return_tensors="pt")
        inputs = {k: v.to(handle.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(handle.dtype)
        out = generate(handle.module, seed, max_new_tokens, **inputs, **sampling, pad_token_id=tok.pad_token_id,
                       eos_token_id=stop_ids(handle.module, tok))
        reasoning, answer, calls = split_turn(_turn_text(tok, out[0, inputs["input_ids"].shape[1]:].tolist()))
        done = run_calls(calls, lambda c: execute(c, pictures[0], side), max_tool_calls, records, steps, reasoning)
        if not done:
            break
        msgs.append(assistant_turn(reasoning, answer, done))
        for r in done:
            msgs.append({"role": "tool", "content": tool_result_content(r, {"type": "image"})})
            if "crop" in r:
                crops.append(r["crop"])
    return answer, "\n\n".join(steps), calls_json(records, *pictures[0].size), crops_batch(crops, pictures[0])


# the same loop through a server ------------------------------------------------------------------------------
def _server_calls(calls: list[dict]) -> list[dict]:
    """The server's parsed tool calls as {"name", "arguments", "id"}; arguments that are not a JSON object become
    an error the model reads back."""
    out = []
    for k, c in enumerate(calls):
        try:
            args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
        except ValueError:
            args = None
        call = {"name": c["name"], "arguments": args if isinstance(args, dict) else {}, "id": c["id"] or f"call_{k}"}
        if not isinstance(args, dict):
            call["bad_arguments"] = c["arguments"]
        out.append(call)
    return out


def remote_think_with_images(base_url: str, model: str, api_key: str, images: torch.Tensor, text: str,
                             system_prompt: str, max_tool_calls: int, max_new_tokens: int, temperature: float,
                             top_p: float, seed: int, stream: bool, timeout: float):
    """The zoom loop against an OpenAI-compatible server: the zoom tool is declared in `tools`, the server's
    tool-call parser (vLLM `--tool-call-parser ernie45 --enable-auto-tool-choice`, FastDeploy
    `ernie-45-vl-thinking`) returns the calls, the crop goes back as a role "tool" message holding the image.
    A server without a tool parser leaves the calls in the text: they are read here the same way."""

    check_loop(max_tool_calls)
    url = remote_openai.chat_url(base_url)
    model = remote.check_model(model)
    pictures = to_pil(images)
    check_aspect(pictures)
    body = remote.build_request(model, images, text, system_prompt, True, max_new_tokens, temperature, top_p, seed,
                                stream)
    body["tools"] = [ZOOM_TOOL]
    body["tool_choice"] = "auto"
    msgs = body["messages"]
    crops, records, steps, answer = [], [], [], ""
    for _ in range(max_tool_calls + 1):
        content, reasoning, server_calls = remote_openai.chat(url, body, model, api_key, timeout, max_new_tokens)
        answer, reasoning = remote.split_text(content, reasoning, True)
        if server_calls:
            calls = _server_calls(server_calls)
        else:  # no tool parser on the server: the calls are in the answer's text
            answer, calls = parse_tool_calls(answer)
            calls = [{**c, "id": f"call_{len(records) + k}"} for k, c in enumerate(calls)]

        def run(c):
            r = execute(c, pictures[0], ZOOM_MIN_SIDE) if "bad_arguments" not in c else {
                "name": c["name"], "arguments": {}, "error": f"The arguments are not a JSON object: {c['bad_arguments']}"}
            return {**r, "id": c["id"]}

        done = run_calls(calls, run, max_tool_calls, records, steps, reasoning)
        if not done:
            break
        msgs.append({"role": "assistant", "content": answer or None, "tool_calls": [
            {"id": r["id"], "type": "function",
             "function": {"name": r["name"], "arguments": json.dumps(r["arguments"], ensure_ascii=False)}}
            for r in done]})
        for r in done:
            part = {"type": "image_url", "image_url": {"url": remote_openai.image_data_url(r["crop"])}} if "crop" in r else None
            msgs.append({"role": "tool", "tool_call_id": r["id"], "content": tool_result_content(r, part)})
            if "crop" in r:
                crops.append(r["crop"])
    return answer, "\n\n".join(steps), calls_json(records, *pictures[0].size), crops_batch(crops, pictures[0])
