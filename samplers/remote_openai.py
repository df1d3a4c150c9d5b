"""Talking to an OpenAI-compatible HTTP server (vLLM, SGLang, FastDeploy, vLLM-Omni): the endpoint URL, one
chat-completions exchange (streamed or whole, with tool calls), and clear errors. Standard library only (http.client).

Servers decode the answer with special tokens skipped unless told otherwise: a request may ask for
`skip_special_tokens: false` and `spaces_between_special_tokens: false` (KEEP_SPECIAL_TOKENS, vLLM's and SGLang's
sampling fields); a server that refuses unknown fields (transformers serve answers 422 "Unexpected fields") is asked
again without them. The reasoning comes back in `reasoning_content` (or `reasoning`) when the server runs a reasoning
parser.

The HTTP exchange runs in a worker thread; the node's thread waits on a queue in short slices, so Cancel and
progress (one step per streamed chunk) work while the server is busy; Cancel closes the connection. Every error
becomes a LetterpressError that says what happened and what to check.

`Exchange` (one POST on its own connection, closable from another thread) and `as_error` are shared with the
image engines' clients (samplers/remote_image.py). They use http.client directly: a request goes to the host and
port of the URL the user typed and nowhere else (no redirect is followed, no proxy from the environment is used).
"""
from __future__ import annotations

import base64
import io
import http.client
import json
import queue
import socket
import threading
import urllib.parse
from typing import Iterator

from ..loaders.errors import LetterpressError
from ..loaders.host import get_host


# Decode with special tokens kept (vLLM / SGLang sampling parameters), so <|LOC_n|> boxes arrive.
KEEP_SPECIAL_TOKENS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}


def endpoint(base_url: str, path: str) -> str:
    """The base URL (e.g. http://host:8000/v1) with the endpoint's path appended (unless it already ends so)."""
    url = base_url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LetterpressError(f"Base URL '{base_url}' must start with http:// or https:// and name a host "
                               "(e.g. http://127.0.0.1:8000/v1).")
    if parts.query or parts.fragment:
        raise LetterpressError(f"Base URL '{base_url}' must not hold a query (?...) or fragment (#...).")
    return url if url.endswith(path) else url + path


def chat_url(base_url: str) -> str:
    return endpoint(base_url, "/chat/completions")


class ServerError(Exception):
    """An HTTP answer other than 2xx: status, reason, body and (for a redirect) where it pointed."""

    def __init__(self, status: int, reason: str, body: bytes, location: str | None = None):
        super().__init__(f"HTTP {status}")
        self.status, self.reason, self.body, self.location = status, reason, body, location


class Exchange:
    """One request on its own connection: a JSON POST (`body` a dict), a POST of ready-made bytes (`body` bytes,
    e.g. a multipart form, with its `content_type`), or a GET (`body` None). `abort()` from another thread closes
    the connection, which ends a wait for the answer at once (Cancel) and tells the server the client has gone."""

    def __init__(self, url: str, body: dict | bytes | None, api_key: str, timeout: float,
                 accept: str = "application/json", content_type: str = "application/json"):
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = kind(parts.hostname, parts.port, timeout=timeout)
        self.path = parts.path or "/"
        self.method = "GET" if body is None else "POST"
        self.data = json.dumps(body).encode("utf-8") if isinstance(body, dict) else body
        self.headers = {"Accept": accept}
        if body is not None:
            self.headers["Content-Type"] = content_type
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._lock = threading.Lock()
        self._aborted = False

    def send(self) -> http.client.HTTPResponse:
        """Sends the request and waits for the answer's status line; a non-2xx answer raises ServerError."""
        self.conn.connect()
        with self._lock:
            if self._aborted:
                self.conn.close()
                raise ConnectionAbortedError("cancelled")
        self.conn.request(self.method, self.path, body=self.data, headers=self.headers)
        resp = self.conn.getresponse()
        if not 200 <= resp.status < 300:
            raise ServerError(resp.status, resp.reason, resp.read() or b"", resp.getheader("Location"))
        return resp

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self.conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conn.close()


def image_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(raw: bytes) -> str:
    """The message in an error body: vLLM's {"error": {"message"}} or flat {"object": "error", "message"},
    FastAPI's {"detail": "..."} or its validation list {"detail": [{"loc", "msg"}]}, or the text itself."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            err = err.get("message") or err.get("detail") or err
        if isinstance(err, list):  # FastAPI's request validation errors
            err = "; ".join(".".join(str(x) for x in e.get("loc", [])[1:]) + ": " + str(e.get("msg", ""))
                            if isinstance(e, dict) else str(e) for e in err)
        return str(err)[:300]
    return text[:300]


def sentence(text: str) -> str:
    """`text` on one line, ending in exactly one full stop (a server's message may end in one already)."""
    text = " ".join(str(text).split()).rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _http_error(url: str, e: ServerError, model: str) -> LetterpressError:
    if 300 <= e.status < 400:
        where = f" to {e.location}" if e.location else ""
        return LetterpressError(f"The server at {url} answered HTTP {e.status} (redirect{where}). Remote nodes send "
                                "only to the URL typed and follow no redirect: give the final address as the base URL.")
    msg = _server_message(e.body)
    hint = {401: " Check the API key.", 403: " Check the API key.",
            404: f" Check the base URL (usually ending in /v1) and the model name '{model}'."}.get(e.status, "")
    return LetterpressError(sentence(f"The server at {url} answered HTTP {e.status}: {msg or e.reason}") + hint)


def _refuses_keep_fields(e: BaseException) -> bool:
    """The server refused the request because of the special-token fields (it takes no unknown fields)."""
    return isinstance(e, ServerError) and e.status in (400, 422) and b"skip_special_tokens" in (e.body or b"")


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


def _worker(exchange: Exchange, stream: bool, out: queue.Queue, stop: threading.Event) -> None:
    try:
        with exchange.send() as resp:
            if stream:
                for event in _sse_events(resp):
                    if stop.is_set():
                        return
                    out.put(("chunk", event))
            else:
                out.put(("whole", json.loads(resp.read().decode("utf-8"))))
        out.put(("done", None))
    except BaseException as e:  # handed to the node's thread, which turns it into a clear error
        out.put(("error", e))


def _delta_text(choice: dict, key: str) -> tuple[str, str]:
    if not isinstance(choice, dict) or not isinstance(choice.get(key) or {}, dict):
        raise LetterpressError(f"The server's answer is not in the chat-completions format: {str(choice)[:300]}")
    part = choice.get(key) or {}
    content = part.get("content") or ""
    reasoning = part.get("reasoning_content") or part.get("reasoning") or ""
    return content, reasoning


def _add_tool_deltas(calls: list[dict], deltas) -> None:
    """Folds streamed tool-call pieces (OpenAI: index, id, function name, argument text in pieces) into `calls`."""
    for d in deltas or []:
        if not isinstance(d, dict):
            raise LetterpressError(f"The server sent a tool call that is not an object: {str(d)[:300]}")
        k = d.get("index", len(calls))
        if not isinstance(k, int) or k < 0:
            k = len(calls)
        while len(calls) <= k:
            calls.append({"id": None, "name": "", "arguments": ""})
        fn = d.get("function") or {}
        if d.get("id"):
            calls[k]["id"] = d["id"]
        if fn.get("name"):
            calls[k]["name"] = fn["name"]
        if fn.get("arguments") is not None:
            args = fn["arguments"]
            calls[k]["arguments"] += args if isinstance(args, str) else json.dumps(args)


def chat(url: str, body: dict, model: str, api_key: str, timeout: float,
         max_new_tokens: int) -> tuple[str, str, list[dict]]:
    """One chat-completions exchange: (content, reasoning, tool calls [{"id", "name", "arguments" (JSON text)}])."""
    host = get_host()
    bar = host.progress(max_new_tokens)
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    stream = bool(body.get("stream"))
    accept = "text/event-stream" if stream else "application/json"
    exchange = Exchange(url, body, api_key.strip(), timeout, accept)
    threading.Thread(target=_worker, args=(exchange, stream, out, stop), daemon=True).start()
    content, reasoning, calls = [], [], []
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
                    _add_tool_deltas(calls, (choice.get("delta") or {}).get("tool_calls"))
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
                _add_tool_deltas(calls, [{"index": k, **t} for k, t in enumerate(
                    (choices[0].get("message") or {}).get("tool_calls") or []) if isinstance(t, dict)])
                tokens = (value.get("usage") or {}).get("completion_tokens")
                bar.update(min(int(tokens), max_new_tokens) if isinstance(tokens, int) else max_new_tokens)
            elif kind == "done":
                break
            elif _refuses_keep_fields(value) and "skip_special_tokens" in body:  # ask again without them
                body = {k: v for k, v in body.items() if k not in KEEP_SPECIAL_TOKENS}
                exchange = Exchange(url, body, api_key.strip(), timeout, accept)
                threading.Thread(target=_worker, args=(exchange, stream, out, stop), daemon=True).start()
            else:
                raise as_error(value, url, model, timeout)
    finally:
        stop.set()
        exchange.abort()  # Cancel or an error: the connection closes, the server sees the client leave
        bar.close()
    return "".join(content), "".join(reasoning), calls


def as_error(e: BaseException, url: str, model: str, timeout: float,
             api: str = "OpenAI chat-completions") -> LetterpressError:
    """A clear node error for whatever the exchange with the server raised."""
    if isinstance(e, LetterpressError):
        return e
    if isinstance(e, ServerError):
        return _http_error(url, e, model)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return LetterpressError(f"No answer from {url} within {timeout:g} s. The server is busy or stuck; "
                                "raise the timeout or check the server.")
    if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
        return LetterpressError(sentence(f"Could not reach {url}: {e}") + " Is the server running, and is the base URL right?")
    if isinstance(e, http.client.RemoteDisconnected):
        return LetterpressError(f"The server at {url} closed the connection without answering ({e}). "
                                "Check the server's log.")
    if isinstance(e, (ValueError, http.client.HTTPException)):  # a JSON decode error is a ValueError
        return LetterpressError(f"The server at {url} did not answer in the {api} format ({e}).")
    if isinstance(e, (ConnectionError, OSError)):
        return LetterpressError(sentence(f"The connection to {url} failed: {e}"))
    return LetterpressError(sentence(f"The request to {url} failed: {e!r}"))
