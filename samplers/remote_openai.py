"""The VL Generate request sent to an OpenAI-compatible chat-completions server (vLLM, SGLang and FastDeploy
serve ERNIE-4.5-VL this way). Standard library only (urllib).

Images travel as base64 PNG data URLs in the user message, before the text, as the local node orders them.
Thinking is switched with `chat_template_kwargs: {"enable_thinking": ...}`, which these servers pass to the
model's chat template. Servers decode the answer with special tokens skipped unless told otherwise, which drops
ERNIE's grounding coordinates (`<|LOC_n|>`): the request asks for `skip_special_tokens: false` and
`spaces_between_special_tokens: false` (vLLM's and SGLang's sampling fields). A server that refuses unknown fields
(transformers serve answers 422 "Unexpected fields") is asked again without them, and its answer then has no
special tokens (Parse Boxes says so when it finds no boxes). The reasoning comes back in `reasoning_content` (or `reasoning`) when the server runs a
reasoning parser; otherwise a `</think>` in the content is split here.

The HTTP exchange runs in a worker thread; the node's thread waits on a queue in short slices, so Cancel and
progress (one step per streamed chunk) work while the server is busy. Every error becomes a LetterpressError
that says what happened and what to check.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import socket
import threading
import urllib.error
import urllib.request
from typing import Iterator

from ..loaders.errors import LetterpressError

from ..loaders.host import get_host
from .ernie_vl import THINK_CLOSE, THINK_OPEN, messages, to_pil
from .generate import check_request, sampling_args


# Decode with special tokens kept (vLLM / SGLang sampling parameters), so <|LOC_n|> boxes arrive.
KEEP_SPECIAL_TOKENS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}


def chat_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LetterpressError(f"Base URL '{base_url}' must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1).")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def image_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_request(model: str, images, text: str, system_prompt: str, thinking: bool, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, stream: bool) -> dict:
    check_request(max_new_tokens, seed)
    sampling = sampling_args(temperature, top_p)  # the same checks and greedy rule as local generation
    msgs = messages(0, text, system_prompt)
    user = msgs[-1]
    user["content"] = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in to_pil(images)] + [
        {"type": "text", "text": text}]
    body = {"model": model, "messages": msgs, "max_tokens": int(max_new_tokens), "stream": bool(stream),
            "seed": int(seed) & 0x7FFFFFFFFFFFFFFF, "chat_template_kwargs": {"enable_thinking": bool(thinking)}}
    body.update(KEEP_SPECIAL_TOKENS)
    if sampling["do_sample"]:
        body["temperature"] = float(temperature)
        body["top_p"] = float(top_p)
    else:
        body["temperature"] = 0.0  # greedy
    return body


def _server_message(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(err)[:300]
    return text[:300]


class _Refused(Exception):
    """An HTTP error answer, its body read in the worker thread."""

    def __init__(self, code: int, reason: str, body: bytes):
        super().__init__(code, reason)
        self.code, self.reason, self.body = code, reason, body


def _http_error(url: str, e: _Refused, model: str) -> LetterpressError:
    msg = _server_message(e.body or b"")
    hint = {401: " Check the API key.", 403: " Check the API key.",
            404: f" Check the base URL (usually ending in /v1) and the model name '{model}'."}.get(e.code, "")
    return LetterpressError(f"The server at {url} answered HTTP {e.code}: {msg or e.reason}.{hint}")


def _refuses_keep_fields(e: BaseException) -> bool:
    """The server refused the request because of the special-token fields (it takes no unknown fields)."""
    return isinstance(e, _Refused) and e.code in (400, 422) and b"skip_special_tokens" in (e.body or b"")


def _sse_events(resp) -> Iterator[dict]:
    """The stream's chunks; a ValueError (reported as 'not the chat-completions format') for a reply that is no
    event stream, an error sent mid-stream, or a stream cut off before its end."""
    finished = seen = False
    for line in resp:
        line = line.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        seen = True
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError(f"a stream event that is not an object: {payload[:200]}")
        if "error" in event or event.get("object") == "error":
            raise ValueError(f"the server reported an error mid-stream: {_server_message(payload.encode())}")
        finished = finished or any(isinstance(c, dict) and c.get("finish_reason") for c in event.get("choices") or [])
        yield event
    if not seen:
        raise ValueError("the reply held no event stream (data: lines); if the server does not stream, turn stream off")
    if not finished:
        raise ValueError("the stream ended before the answer did (no [DONE] nor finish_reason): the connection was cut")


def _worker(url: str, body: dict, api_key: str, timeout: float, out: queue.Queue, stop: threading.Event) -> None:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if body["stream"] else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if body["stream"]:
                for event in _sse_events(resp):
                    if stop.is_set():
                        return
                    out.put(("chunk", event))
            else:
                out.put(("whole", json.loads(resp.read().decode("utf-8"))))
        out.put(("done", None))
    except urllib.error.HTTPError as e:
        out.put(("error", _Refused(e.code, str(e.reason), e.read() or b"")))
    except BaseException as e:  # handed to the node's thread, which turns it into a clear error
        out.put(("error", e))


def _delta_text(choice: dict, key: str) -> tuple[str, str]:
    if not isinstance(choice, dict) or not isinstance(choice.get(key) or {}, dict):
        raise LetterpressError(f"The server's answer is not in the chat-completions format: {str(choice)[:300]}")
    part = choice.get(key) or {}
    content = part.get("content") or ""
    reasoning = part.get("reasoning_content") or part.get("reasoning") or ""
    return content, reasoning


def split_text(content: str, reasoning: str, thinking: bool) -> tuple[str, str]:
    if not reasoning and THINK_CLOSE in content:
        reasoning, content = content.split(THINK_CLOSE, 1)
        reasoning = reasoning.replace(THINK_OPEN, "")
    elif not reasoning and thinking and THINK_OPEN in content:
        return "", content.replace(THINK_OPEN, "").strip()  # the reasoning never closed
    return content.strip(), reasoning.strip()


def remote_generate(base_url: str, model: str, api_key: str, images, text: str, system_prompt: str, thinking: bool,
                    max_new_tokens: int, temperature: float, top_p: float, seed: int, stream: bool,
                    timeout: float) -> tuple[str, str]:
    """(answer, reasoning) from the server."""
    url = chat_url(base_url)
    if not model.strip():
        raise LetterpressError("The model name is empty: give the name the server serves (e.g. baidu/ERNIE-4.5-VL-28B-A3B-PT).")
    body = build_request(model.strip(), images, text, system_prompt, thinking, max_new_tokens, temperature, top_p,
                         seed, stream)
    host = get_host()
    bar = host.progress(max_new_tokens)
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=_worker, args=(url, body, api_key.strip(), timeout, out, stop), daemon=True).start()
    content, reasoning = [], []
    try:
        while True:
            try:
                kind, value = out.get(timeout=0.05)
            except queue.Empty:
                host.check_interrupt()
                continue
            if kind == "chunk":
                for choice in value.get("choices") or []:
                    c, r = _delta_text(choice, "delta")
                    content.append(c)
                    reasoning.append(r)
                if value.get("choices") and bar.done < max_new_tokens:  # a usage-only chunk is no token
                    bar.update(1)
                host.check_interrupt()
            elif kind == "whole":
                choices = value.get("choices") if isinstance(value, dict) else None
                if not choices:
                    raise LetterpressError(f"The server at {url} sent no choices: {str(value)[:300]}")
                c, r = _delta_text(choices[0], "message")
                content.append(c)
                reasoning.append(r)
                tokens = (value.get("usage") or {}).get("completion_tokens")
                bar.update(min(int(tokens), max_new_tokens) if isinstance(tokens, int) else max_new_tokens)
            elif kind == "done":
                break
            elif _refuses_keep_fields(value) and "skip_special_tokens" in body:  # ask again without them
                body = {k: v for k, v in body.items() if k not in KEEP_SPECIAL_TOKENS}
                threading.Thread(target=_worker, args=(url, body, api_key.strip(), timeout, out, stop),
                                 daemon=True).start()
            else:
                raise _as_error(value, url, model, timeout)
    finally:
        stop.set()
        bar.close()
    return split_text("".join(content), "".join(reasoning), thinking)


def _as_error(e: BaseException, url: str, model: str, timeout: float) -> LetterpressError:
    if isinstance(e, _Refused):
        return _http_error(url, e, model)
    if isinstance(e, (socket.timeout, TimeoutError)) or (
            isinstance(e, urllib.error.URLError) and isinstance(e.reason, (socket.timeout, TimeoutError))):
        return LetterpressError(f"No answer from {url} within {timeout:g} s. The server is busy or stuck; "
                                "raise the timeout or check the server.")
    if isinstance(e, urllib.error.URLError):
        return LetterpressError(f"Could not reach {url}: {e.reason}. Is the server running, and is the base URL right?")
    if isinstance(e, ValueError):
        return LetterpressError(f"The server at {url} did not answer in the OpenAI chat-completions format ({e}).")
    if isinstance(e, (ConnectionError, OSError)):
        return LetterpressError(f"The connection to {url} failed: {e}.")
    return LetterpressError(f"The request to {url} failed: {e!r}.")
