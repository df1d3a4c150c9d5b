"""ERNIE-VL Remote Generate against a small OpenAI-protocol server on 127.0.0.1 (started and stopped here):
request shape with base64 images, plain and streamed answers, reasoning, HTTP errors, timeouts, Cancel."""

from __future__ import annotations

import base64
import io
import json
import select
import socket
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.standin_servers import JsonHandler

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N


class Handler(JsonHandler):
    """Behaviour chosen by the requested model name."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/v1/chat/completions":
            return self._json(404, {"detail": "Not Found"})
        model = body["model"]
        if model == "needs-key" and self.headers.get("Authorization") != "Bearer secret":
            return self._json(401, {"error": {"message": "invalid api key"}})
        if model == "hold":  # signals it has the request, then waits for the client to close the connection
            self.server.got_hold.set()
            select.select([self.connection], [], [], 60)  # readable at EOF: the client closed it
            self.server.client_closed.set()
            return
        if model == "strict" and "skip_special_tokens" in body:  # transformers serve: no unknown fields
            return self._json(422, {"detail": "Unexpected fields in the request: {'skip_special_tokens', "
                                              "'spaces_between_special_tokens'}"})
        if model == "slow":  # answers only when the test ends (30 s at most): the client can only give up by its timeout
            self.server.release.wait(30)
            return
        if model == "garbage":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not json</html>")
            return
        if not body["stream"] or model == "ignores-stream":
            content = "<think>look closer</think>A red cat." if model == "inline-think" else "A red cat."
            message = {"role": "assistant", "content": content}
            if model == "with-reasoning":
                message["reasoning_content"] = "I see fur."
            return self._json(200, {"choices": [{"index": 0, "message": message}], "usage": {"completion_tokens": 4}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = [("reasoning_content", "I see "), ("reasoning_content", "fur."), ("content", "A red"), ("content", " cat.")]
        if model == "endless":  # more than any test reads: only a client that stops ends it early
            pieces = (("content", f"w{i} ") for i in range(200_000))
        for i, (key, text) in enumerate(pieces):
            chunk = {"choices": [{"index": 0, "delta": {key: text}}]}
            if model == "error-mid-stream" and i == 2:
                chunk = {"object": "error", "message": "engine overloaded"}  # vLLM's shape
            if model == "finish-without-done" and i == len(pieces) - 1:
                chunk["choices"][0]["finish_reason"] = "stop"
            try:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            except OSError:
                return
        if model == "streamed":  # vLLM's stream_options include_usage: a last chunk with no choices
            usage = {"choices": [], "usage": {"completion_tokens": len(pieces)}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
        if model not in ("cut-off", "finish-without-done"):
            self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.requests = []
    srv.release = threading.Event()
    srv.got_hold, srv.client_closed = threading.Event(), threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def images(n=2):
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, 20, 24, 3)).astype(np.float32) / 255.0)


def remote(base, model, imgs=None, thinking=False, stream=False, timeout=10.0, api_key="", prompt="what is this?",
           temperature=0.0):
    return N["LetterpressErnieVLRemoteGenerate"]().run(
        base, model, api_key, images() if imgs is None else imgs, "free question", prompt, "be brief", thinking, 64,
        temperature, 0.9, 7, stream, timeout)


def test_request_shape(server):
    imgs = images(2)
    assert remote(url(server), "plain", imgs, thinking=True, api_key="secret") == ("A red cat.", "")
    req = server.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer secret"
    body = req["body"]
    assert body["model"] == "plain" and body["max_tokens"] == 64 and body["stream"] is False
    assert body["temperature"] == 0.0 and body["seed"] == 7
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    # special tokens kept (vLLM's and SGLang's sampling fields), so ERNIE's <|LOC_n|> boxes arrive
    assert body["skip_special_tokens"] is False and body["spaces_between_special_tokens"] is False
    system, user = body["messages"]
    assert system == {"role": "system", "content": "be brief"}
    assert [c["type"] for c in user["content"]] == ["image_url", "image_url", "text"]
    assert user["content"][2]["text"] == "what is this?"
    for k, part in enumerate(user["content"][:2]):
        head, data = part["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64"
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert np.array_equal(png, np.round(imgs[k].numpy() * 255).astype(np.uint8))  # the exact pixels


def test_sampling_settings_are_sent(server):
    remote(url(server), "plain", temperature=0.7)
    body = server.requests[-1]["body"]
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9


def test_bad_sampling_values_are_refused_before_any_request(server):
    """The same checks as local generation, before the server is asked (top_p 0 is greedy there too)."""
    before = len(server.requests)
    node = N["LetterpressErnieVLRemoteGenerate"]()
    args = dict(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=7)
    for bad, message in ((dict(temperature=float("nan")), "temperature must be 0"), (dict(top_p=1.5), "top_p must be"),
                         (dict(max_new_tokens=0), "max_new_tokens must be at least 1"), (dict(seed=-1), "seed must be")):
        a = {**args, **bad}
        with pytest.raises(LetterpressError, match=message):
            node.run(url(server), "plain", "", images(), "free question", "?", "", False, a["max_new_tokens"],
                     a["temperature"], a["top_p"], a["seed"], False, 10.0)
    assert len(server.requests) == before
    node.run(url(server), "plain", "", images(), "free question", "?", "", False, 64, 0.7, 0.0, 7, False, 10.0)
    assert server.requests[-1]["body"]["temperature"] == 0.0 and "top_p" not in server.requests[-1]["body"]


def test_a_server_that_refuses_the_special_token_fields_is_asked_again_without_them(server):
    before = len(server.requests)
    assert remote(url(server), "strict") == ("A red cat.", "")
    first, second = [r["body"] for r in server.requests[before:]]
    assert first["skip_special_tokens"] is False
    assert "skip_special_tokens" not in second and "spaces_between_special_tokens" not in second
    assert {k: v for k, v in first.items() if "special_tokens" not in k} == second


def test_reasoning_from_the_server_or_inline(server):
    assert remote(url(server), "with-reasoning", thinking=True) == ("A red cat.", "I see fur.")
    assert remote(url(server), "inline-think", thinking=True) == ("A red cat.", "look closer")


def test_streaming_with_progress(server, host):
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append(done))
    assert remote(url(server), "streamed", stream=True, thinking=True) == ("A red cat.", "I see fur.")
    assert server.requests[-1]["body"]["stream"] is True
    assert ticks == [1, 2, 3, 4]  # one step per streamed token chunk; the usage chunk is none


def test_cancel_while_streaming(server, host):
    """Cancel at the second streamed piece: the node stops reading (a client that read on would get 200,000 pieces
    and an answer instead of Interrupted)."""
    seen = []
    host.progress_listeners.append(lambda done, total: (seen.append(done), host.request_interrupt() if done == 2 else None))
    with pytest.raises(Interrupted):
        remote(url(server), "endless", stream=True)
    assert max(seen) <= 3


def test_cancel_while_waiting_closes_the_connection(server, host):
    """The stand-in signals it holds the request; Cancel then ends the wait at once and the node closes the
    connection, which the stand-in sees (a handshake both ways, no clock)."""
    def cancel_when_held():
        if server.got_hold.wait(60):
            host.request_interrupt()

    threading.Thread(target=cancel_when_held, daemon=True).start()
    with pytest.raises(Interrupted):
        remote(url(server), "hold", stream=True, timeout=3600.0)  # only closing ends it: no timeout will
    assert server.client_closed.wait(60)


def test_http_errors_become_clear_node_errors(server):
    with pytest.raises(LetterpressError, match=r"HTTP 401: invalid api key.*API key"):
        remote(url(server), "needs-key", api_key="wrong")
    with pytest.raises(LetterpressError, match="HTTP 404.*base URL"):
        remote(f"http://127.0.0.1:{server.server_address[1]}/nothing-here", "plain")
    with pytest.raises(LetterpressError, match="OpenAI chat-completions format"):
        remote(url(server), "garbage")


def test_timeout(server):
    with pytest.raises(LetterpressError, match=r"No answer from .* within 0.3 s"):
        remote(url(server), "slow", timeout=0.3)


def test_unreachable_server_and_bad_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(LetterpressError, match="Could not reach .*Is the server running"):
        remote(f"http://127.0.0.1:{port}/v1", "plain", timeout=2.0)
    with pytest.raises(LetterpressError, match="must start with http"):
        remote("127.0.0.1:8000/v1", "plain")
    with pytest.raises(LetterpressError, match="model name is empty"):
        remote("http://127.0.0.1:1/v1", " ")


def test_broken_streams_are_errors_not_partial_answers(server):
    with pytest.raises(LetterpressError, match="error mid-stream: engine overloaded"):
        remote(url(server), "error-mid-stream", stream=True)
    with pytest.raises(LetterpressError, match="stream ended before the answer did"):
        remote(url(server), "cut-off", stream=True)
    with pytest.raises(LetterpressError, match="no event stream.*turn stream off"):
        remote(url(server), "ignores-stream", stream=True)
    with pytest.raises(LetterpressError, match="chat-completions format"):
        remote(url(server), "garbage", stream=True)
    # a last chunk that says it finished is a complete answer, [DONE] or not
    assert remote(url(server), "finish-without-done", stream=True, thinking=True) == ("A red cat.", "I see fur.")


def vllm_frames(url):
    """What vLLM reads from a video_url (its VideoMediaIO.load_base64, read here in our own words): a data URL of
    media type video/jpeg is a list of base64 JPEG frames separated by commas, taken as they are (no resampling)."""
    head, data = url.split(",", 1)
    assert head == "data:video/jpeg;base64"
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(f))).convert("RGB")) for f in data.split(",")])


def test_a_video_goes_as_vllms_frame_list_of_the_frames_the_original_rule_picks(server):
    """30 frames at 10 fps are 3 s: at the original's 2 frames per second and at least 16 (its minimum, never more
    than the clip has) the server gets 16 of them, evenly from the first, after the pictures and before the text."""
    k, y, x, c = np.meshgrid(np.arange(30), np.arange(48), np.arange(64), np.arange(3), indexing="ij")
    frames = (k * 5 + x + y // 2 + c * 10).astype(np.uint8)  # smooth (JPEG keeps it), 5 levels apart frame to frame
    clip = N["LetterpressErnieVLVideo"]().run(2.0, frames=torch.from_numpy(frames.astype(np.float32) / 255.0),
                                             frame_rate=10.0)[0]
    assert N["LetterpressErnieVLRemoteGenerate"]().run(
        url(server), "plain", "", images(1), "free question", "what happens?", "", False, 64, 0.0, 0.9, 7, False, 10.0,
        video=clip) == ("A red cat.", "")
    user = server.requests[-1]["body"]["messages"][-1]
    assert [c["type"] for c in user["content"]] == ["image_url", "video_url", "text"]
    got = vllm_frames(user["content"][1]["video_url"]["url"])
    picked = frames[[int(i * 30 / 16) for i in range(16)]]  # transformers' rule: arange(0, 30, 30 / 16)
    assert got.shape == picked.shape
    assert np.abs(got.astype(int) - picked.astype(int)).mean() < 1.5  # JPEG at quality 95; a neighbour is 5 off
    # a video alone needs no image
    N["LetterpressErnieVLRemoteGenerate"]().run(url(server), "plain", "", None, "free question", "what happens?", "",
                                               False, 64, 0.0, 0.9, 7, False, 10.0, video=clip)
    assert [c["type"] for c in server.requests[-1]["body"]["messages"][-1]["content"]] == ["video_url", "text"]
