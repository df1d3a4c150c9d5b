"""Image models on the serving engines that spread them over GPUs and machines, through the engines' OpenAI
images API: what every engine shares. Standard library HTTP only (the Exchange, error mapping and Cancel of
samplers/remote_openai.py); the request bodies each engine reads, field by field, are in the family's
samplers/<key>_remote.py over samplers/remote_requests.py.

Before generating, each node asks the server what it serves (`GET {base}/models`, which the engines answer with
the names they serve) and stops with an error naming them when the model name is not among them: SGLang never
checks the name of an images request, so without this a misspelled name would draw with whatever it serves.

Every error becomes a LetterpressError naming what happened (a model the server does not serve, a size it cannot
do, timeout, an answer not in the API's shape); Cancel closes every open connection.
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
from .remote_openai import Exchange, as_error, endpoint, sentence

IMAGES_API, MODELS_API = "OpenAI images (b64_json)", "OpenAI models list"


def check_common(model: str, prompt: str, steps: int, guidance: float, seed: int, batch_size: int,
                 timeout: float, example: str) -> None:
    """The inputs every Remote node sends, checked before any request; `example` is a model name to suggest."""
    if not model.strip():
        raise LetterpressError(f"The model name is empty: give the name the server serves (e.g. {example}).")
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


def images_api_pictures(answer) -> list[torch.Tensor]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"no 'data' list of images in {str(answer)[:200]}")
    if any(d.get("b64_json") is None for d in data):
        raise ValueError("an image came without 'b64_json' (a 'url' instead?): the server ignored "
                         "response_format b64_json")
    return [decode_picture(d["b64_json"], f"data[{i}].b64_json") for i, d in enumerate(data)]


def _worker(index: int, exchange: Exchange, out: queue.Queue) -> None:
    try:
        with exchange.send() as resp:
            out.put(("answer", index, json.loads(resp.read().decode("utf-8"))))
    except BaseException as e:  # the node's thread turns it into a clear error
        out.put(("error", index, e))
    finally:
        exchange.abort()  # one request per connection: closed once answered


def exchange_all(url: str, exchanges: list[Exchange], concurrency: int, on_answer: Callable[[int, object], None],
                 model: str, timeout: float, api: str) -> None:
    """Sends `exchanges` with at most `concurrency` in flight, each on its own connection, and hands every JSON
    answer to on_answer(index, answer) in the node's thread, which waits in short slices and checks Cancel. On
    Cancel or any error every open connection is closed."""
    host = get_host()
    out: queue.Queue = queue.Queue()
    pending = list(range(len(exchanges)))
    open_: dict[int, Exchange] = {}
    try:
        while pending or open_:
            while pending and len(open_) < max(1, concurrency):
                i = pending.pop(0)
                open_[i] = exchanges[i]
                threading.Thread(target=_worker, args=(i, exchanges[i], out), daemon=True,
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
                on_answer(i, value)
            except LetterpressError:
                raise
            except ValueError as e:
                raise LetterpressError(sentence(f"The server at {url} did not answer in the {api} format: {e}")) from None
            host.check_interrupt()
    finally:
        for exchange in open_.values():
            exchange.abort()


def served_models(base_url: str, api_key: str, timeout: float) -> list[str]:
    """The model names the server serves: `GET {base}/models` (vLLM-Omni 0.30.0 api_server.py
    `show_available_models`; SGLang 0.5.23 common_api.py `available_models`), `{"data": [{"id": ...}, ...]}`."""
    url = endpoint(base_url, "/models")
    found: list[str] = []

    def read(_, answer):
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not all(isinstance(d, dict) and isinstance(d.get("id"), str) for d in data):
            raise ValueError(f"no 'data' list of models with an 'id' each in {str(answer)[:200]}")
        found.extend(d["id"] for d in data)

    exchange_all(url, [Exchange(url, None, api_key, timeout)], 1, read, "", timeout, MODELS_API)
    return found


def check_served_model(base_url: str, model: str, api_key: str, timeout: float) -> None:
    """Stops before any generation when the server does not serve `model`, naming what it serves."""
    names = served_models(base_url, api_key, timeout)
    if model not in names:
        listed = ", ".join(f"'{n}'" for n in names) or "no model"
        raise LetterpressError(f"The server at {base_url.strip()} serves {listed}, not '{model}'. Set model_name to "
                               "the name it serves (its --served-model-name, else its model path).")


def run_requests(url: str, exchanges: list[Exchange], timeout: float, concurrency: int, expect: list[int],
                 model: str, api: str) -> list[torch.Tensor]:
    """Sends the image requests; the progress bar moves by the images each answer brings. Returns the images in
    request order; an answer with another count than asked is an error, never a silent short batch."""
    bar = get_host().progress(sum(expect))
    results: dict[int, list[torch.Tensor]] = {}

    def read(i, answer):
        images = images_api_pictures(answer)
        if len(images) != expect[i]:
            raise LetterpressError(f"The server at {url} sent {len(images)} image(s) where {expect[i]} were asked "
                                   "for. Check the engine's limits on images per request.")
        results[i] = images
        bar.update(len(images))

    try:
        exchange_all(url, exchanges, concurrency, read, model, timeout, api)
    finally:
        bar.close()
    return [img for i in range(len(exchanges)) for img in results[i]]


def stack(images: list[torch.Tensor], width: int, height: int, url: str) -> torch.Tensor:
    for img in images:
        if tuple(img.shape[:2]) != (height, width):
            raise LetterpressError(f"The server at {url} sent a {img.shape[1]}x{img.shape[0]} image for the "
                                   f"{width}x{height} asked: it cannot do that size. Pick a size the model serves.")
    return torch.stack(images)
