"""The image models on the serving engines that spread them over GPUs and machines: ERNIE-Image through SGLang
Diffusion's OpenAI images API, GLM-Image through vLLM-Omni's chat-completions API. Standard library HTTP only
(the Exchange, error mapping and Cancel of samplers/remote_openai.py).

What is sent follows each engine's own documentation and request code, as read for this module:

- SGLang Diffusion (`sglang serve --model-path baidu/ERNIE-Image-Turbo --num-gpus N`; docs "SGLang Diffusion OpenAI
  API", python/sglang/multimodal_gen/runtime/entrypoints/openai/protocol.py `ImageGenerationsRequest`):
  `POST {base}/images/generations` with `model, prompt, n, size: "WxH", response_format: "b64_json",
  output_format: "png"` and SGLang's extensions `num_inference_steps, guidance_scale, seed`, plus ERNIE-Image's
  own extra field `use_pe` (configs/sample/ernie_image.py; SGLang's default is on, the node's is off so the
  prompt is drawn as typed, like the local workflows without the enhancer). The answer is
  `{"data": [{"b64_json": ...}, ...]}`, one entry per image. SGLang clamps `n` to 1..10 on its side, so the
  batch is at most 10 here, and an answer with another count is an error, never a silent short batch.
- vLLM-Omni (`vllm serve zai-org/GLM-Image --omni`, AR stage and DiT stage on GPUs of their own; docs "GLM-Image
  Online Serving" and "Chat Completions API", vllm_omni/entrypoints/openai/serving_chat.py
  `_create_diffusion_chat_completion`): `POST {base}/chat/completions` with one user message (the prompt as a
  string; with reference images a list: the text part first, then one `image_url` part per image as a base64 PNG
  data URL, the order of the docs' editing example) and the image parameters `height, width,
  num_inference_steps, guidance_scale, seed` in an `"extra_body"` object of the JSON body. The answer's
  `choices[0].message.content` is a list of `image_url` parts holding `data:image/png;base64,...` URLs.
  Where the documents differ: the Chat Completions API page says the OpenAI Python SDK merges `extra_body`
  into the top level while a raw JSON body nests it under an `"extra_body"` key, and that the server reads
  both; the GLM-Image page's raw HTTP examples nest it, and the server code reads the nested object
  ("extra_body (preferred)"), so the nested form is what is sent here. One image per request (the GLM-Image
  page documents no count field), so a batch is several concurrent requests, at most `concurrency` at a time,
  seed + k for the k-th image.

Every error becomes a LetterpressError naming what happened (refused model name, a size the server cannot do,
timeout, an answer not in the documented shape); Cancel closes every open connection.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import queue
import threading
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..loaders.errors import LetterpressError
from ..loaders.host import get_host
from . import ernie_image, glm_image
from .ernie_vl import to_pil
from .images import check_image
from .remote_openai import Exchange, as_error, endpoint, image_data_url

SEED_MASK = 0x7FFFFFFFFFFFFFFF  # the servers read the seed as a signed 64-bit integer
SGLANG_MAX_N = 10  # SGLang: num_outputs_per_prompt = max(1, min(n, 10))
MAX_REFERENCES = 4
IMAGES_API, CHAT_API = "OpenAI images (b64_json)", "vLLM-Omni chat-completions image"


def _check_common(model: str, prompt: str, steps: int, guidance: float, seed: int, batch_size: int,
                  timeout: float) -> None:
    if not model.strip():
        raise LetterpressError("The model name is empty: give the name the server serves (e.g. baidu/ERNIE-Image-Turbo).")
    if not prompt.strip():
        raise LetterpressError("The prompt is empty: the servers refuse a request without one.")
    if not isinstance(steps, int) or steps < 1:
        raise LetterpressError(f"steps must be at least 1, got {steps}.")
    if not (isinstance(guidance, (int, float)) and np.isfinite(guidance) and guidance >= 0):
        raise LetterpressError(f"guidance must be a number >= 0, got {guidance}.")
    if not isinstance(seed, int) or seed < 0:
        raise LetterpressError(f"seed must be an integer >= 0, got {seed}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LetterpressError(f"batch_size must be at least 1, got {batch_size}.")
    if not timeout > 0:
        raise LetterpressError(f"timeout must be above 0 seconds, got {timeout}.")


# Request bodies ------------------------------------------------------------------------------------------


def sglang_request(model: str, prompt: str, width: int, height: int, n: int, steps: int, guidance: float,
                   seed: int, prompt_enhancer: bool) -> dict:
    """The body of SGLang Diffusion's POST /v1/images/generations (use_pe: ERNIE-Image's own extra field)."""
    return {"model": model, "prompt": prompt, "n": int(n), "size": f"{int(width)}x{int(height)}",
            "response_format": "b64_json", "output_format": "png", "num_inference_steps": int(steps),
            "guidance_scale": float(guidance), "seed": int(seed) & SEED_MASK, "use_pe": bool(prompt_enhancer)}


def vllm_omni_request(model: str, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
                      references: list[Image.Image]) -> dict:
    """The body of vLLM-Omni's POST /v1/chat/completions for a diffusion model (GLM-Image)."""
    content: str | list = prompt
    if references:
        content = [{"type": "text", "text": prompt}] + [
            {"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in references]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "extra_body": {"height": int(height), "width": int(width), "num_inference_steps": int(steps),
                           "guidance_scale": float(guidance), "seed": int(seed) & SEED_MASK}}


# Answers -------------------------------------------------------------------------------------------------


def decode_picture(data: str, what: str) -> torch.Tensor:
    """base64 (or a base64 data URL) -> (H, W, 3) float 0..1."""
    if not isinstance(data, str):
        raise ValueError(f"{what} is not a base64 string")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ValueError(f"{what} is a data URL but no base64 image ({head[:60]})")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (binascii.Error, OSError, ValueError) as e:
        raise ValueError(f"{what} is not a picture ({e})") from None
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)


def sglang_images(answer) -> list[torch.Tensor]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"no 'data' list of images in {str(answer)[:200]}")
    if any(d.get("b64_json") is None for d in data):
        raise ValueError("an image came without 'b64_json' (a 'url' instead?): the server ignored "
                         "response_format b64_json")
    return [decode_picture(d["b64_json"], f"data[{i}].b64_json") for i, d in enumerate(data)]


def vllm_omni_images(answer) -> list[torch.Tensor]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"no 'choices' in {str(answer)[:200]}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        raise ValueError(f"the answer is text, not an image: '{content[:200]}'. Is the server running GLM-Image "
                         "with --omni?")
    if not isinstance(content, list):
        raise ValueError(f"choices[0].message.content is neither a list of image parts nor text: {str(message)[:200]}")
    urls = [p.get("image_url", {}).get("url") for p in content
            if isinstance(p, dict) and p.get("type") == "image_url" and isinstance(p.get("image_url"), dict)]
    if not urls:
        raise ValueError(f"choices[0].message.content holds no image_url part: {str(content)[:200]}")
    return [decode_picture(u, "choices[0].message.content image_url") for u in urls]


# Requests in flight --------------------------------------------------------------------------------------


def _worker(index: int, exchange: Exchange, out: queue.Queue) -> None:
    try:
        with exchange.send() as resp:
            out.put(("answer", index, json.loads(resp.read().decode("utf-8"))))
    except BaseException as e:  # the node's thread turns it into a clear error
        out.put(("error", index, e))
    finally:
        exchange.abort()  # one request per connection: closed once answered


def run_requests(url: str, bodies: list[dict], api_key: str, timeout: float, concurrency: int,
                 parse: Callable[[object], list[torch.Tensor]], expect: list[int], model: str,
                 api: str) -> list[torch.Tensor]:
    """Sends `bodies` with at most `concurrency` in flight, each on its own connection; the progress bar moves
    by the images each answer brings. The node's thread waits in short slices for answers, checking Cancel;
    on Cancel or any error every open connection is closed. Returns the images in request order."""
    host = get_host()
    bar = host.progress(sum(expect))
    out: queue.Queue = queue.Queue()
    pending = list(range(len(bodies)))
    open_: dict[int, Exchange] = {}
    results: dict[int, list[torch.Tensor]] = {}
    try:
        while pending or open_:
            while pending and len(open_) < max(1, concurrency):
                i = pending.pop(0)
                open_[i] = Exchange(url, bodies[i], api_key, timeout)
                threading.Thread(target=_worker, args=(i, open_[i], out), daemon=True,
                                 name=f"letterpress-remote-image-{i}").start()
            try:
                kind, i, value = out.get(timeout=0.05)
            except queue.Empty:
                host.check_interrupt()
                continue
            del open_[i]
            if kind == "error":
                raise as_error(value, url, model, timeout, api)
            try:
                images = parse(value)
            except ValueError as e:
                raise LetterpressError(f"The server at {url} did not answer in the {api} format: {e}.") from None
            if len(images) != expect[i]:
                raise LetterpressError(f"The server at {url} sent {len(images)} image(s) where {expect[i]} were asked "
                                       "for. Check the engine's limits on images per request.")
            results[i] = images
            bar.update(len(images))
            host.check_interrupt()
    finally:
        for exchange in open_.values():
            exchange.abort()
        bar.close()
    return [img for i in range(len(bodies)) for img in results[i]]


def _stack(images: list[torch.Tensor], width: int, height: int, url: str) -> torch.Tensor:
    for img in images:
        if tuple(img.shape[:2]) != (height, width):
            raise LetterpressError(f"The server at {url} sent a {img.shape[1]}x{img.shape[0]} image for the "
                                   f"{width}x{height} asked: it cannot do that size. Pick a size the model serves.")
    return torch.stack(images)


# The two engines -----------------------------------------------------------------------------------------


def ernie_image_remote(base_url: str, model: str, api_key: str, prompt: str, width: int, height: int, steps: int,
                       guidance: float, seed: int, batch_size: int, timeout: float,
                       prompt_enhancer: bool = False) -> torch.Tensor:
    """ERNIE-Image(-Turbo) from SGLang Diffusion: one request with n = batch_size."""
    url = endpoint(base_url, "/images/generations")
    _check_common(model, prompt, steps, guidance, seed, batch_size, timeout)
    ernie_image.check_size(width, height)  # as the local nodes check it, before any request
    if batch_size > SGLANG_MAX_N:
        raise LetterpressError(f"batch_size {batch_size} is above {SGLANG_MAX_N}, the most images SGLang makes per "
                               "request (it clamps n). Use 10 or fewer, or chain a second node.")
    body = sglang_request(model.strip(), prompt, width, height, batch_size, steps, guidance, seed, prompt_enhancer)
    images = run_requests(url, [body], api_key.strip(), timeout, 1, sglang_images, [batch_size], model, IMAGES_API)
    return _stack(images, width, height, url)


def reference_images(references: list) -> list[Image.Image]:
    """The wired reference batches, one picture per frame, in order; at most MAX_REFERENCES in all."""
    frames = []
    for k, batch in enumerate(references):
        if batch is not None:
            batch = check_image(batch, f"GLM-Image Remote reference_{k + 1}")
            frames.extend(to_pil(batch))
    if len(frames) > MAX_REFERENCES:
        raise LetterpressError(f"GLM-Image takes at most {MAX_REFERENCES} reference images in all, got {len(frames)} "
                               "(a batch counts one per frame). Pass fewer images, or split the batch.")
    return frames


def glm_image_remote(base_url: str, model: str, api_key: str, prompt: str, width: int, height: int, steps: int,
                     guidance: float, seed: int, batch_size: int, concurrency: int, timeout: float,
                     references: list) -> torch.Tensor:
    """GLM-Image from vLLM-Omni: one request per image (seed + k), at most `concurrency` at a time."""
    url = endpoint(base_url, "/chat/completions")
    _check_common(model, prompt, steps, guidance, seed, batch_size, timeout)
    glm_image.check_size(width, height)  # as the local nodes check it, before any request
    if not isinstance(concurrency, int) or concurrency < 1:
        raise LetterpressError(f"concurrency must be at least 1, got {concurrency}.")
    refs = reference_images(references)
    bodies = [vllm_omni_request(model.strip(), prompt, width, height, steps, guidance, seed + k, refs)
              for k in range(batch_size)]
    images = run_requests(url, bodies, api_key.strip(), timeout, concurrency, vllm_omni_images, [1] * batch_size,
                          model, CHAT_API)
    return _stack(images, width, height, url)
