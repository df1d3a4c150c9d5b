"""ERNIE-Image Remote and GLM-Image Remote against stand-in servers written from SGLang Diffusion's and
vLLM-Omni's documented request/response shapes (tests/fixtures/standin_servers.py): request bodies field by
field, n > 1, the concurrency limit, every server error, Cancel mid-request, and the shipped remote workflows
run headless. Every wait is an event/condition handshake with the stand-in, never a sleep or a clock."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading

import numpy as np
import pytest
import torch
from fixtures.standin_servers import SGLangDiffusionStandIn, VllmOmniStandIn, picture
from PIL import Image

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sglang():
    with SGLangDiffusionStandIn() as srv:
        yield srv


@pytest.fixture
def omni():
    with VllmOmniStandIn() as srv:
        yield srv


def ernie(base, model="baidu/ERNIE-Image-Turbo", prompt="a poster that says \"HELLO\"", width=64, height=48,
          steps=8, guidance=1.0, seed=7, batch_size=1, timeout=30.0, api_key="", prompt_enhancer=False):
    return N["LetterpressErnieImageRemote"]().run(base, model, api_key, prompt, width, height, steps, guidance, seed,
                                                  batch_size, prompt_enhancer, timeout)[0]


def glm(base, model="zai-org/GLM-Image", prompt="a sign that says \"OPEN\"", width=64, height=96, steps=50,
        guidance=1.5, seed=3, batch_size=1, concurrency=2, timeout=30.0, api_key="", **refs):
    return N["LetterpressGlmImageRemote"]().run(base, model, api_key, prompt, width, height, steps, guidance, seed,
                                                batch_size, concurrency, timeout, **refs)[0]


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0)


def decode_data_url(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def in_thread_when(predicate_srv, predicate, action):
    """Runs `action` once the stand-in reports `predicate` (a handshake, not a delay)."""
    def go():
        if predicate_srv.wait_for(predicate):
            action()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


# ERNIE-Image on SGLang Diffusion --------------------------------------------------------------------------


def test_ernie_request_body_is_sglangs_documented_shape(sglang):
    out = ernie(sglang.base_url, api_key="secret", seed=7, steps=8, guidance=1.0)
    req = sglang.requests[-1]
    assert req["path"] == "/v1/images/generations"
    assert req["headers"]["Authorization"] == "Bearer secret"
    assert req["headers"]["Content-Type"] == "application/json"
    # every field, as ImageGenerationsRequest names and types it
    assert req["body"] == {"model": "baidu/ERNIE-Image-Turbo", "prompt": "a poster that says \"HELLO\"", "n": 1,
                           "size": "64x48", "response_format": "b64_json", "output_format": "png",
                           "num_inference_steps": 8, "guidance_scale": 1.0, "seed": 7, "use_pe": False}
    assert out.shape == (1, 48, 64, 3) and out.dtype == torch.float32
    assert torch.equal(out[0], as_image(picture(7, 0, 64, 48)))  # the server's exact pixels


def test_ernie_batch_is_sent_as_n_and_comes_back_in_order(sglang, host):
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    out = ernie(sglang.base_url, batch_size=4, prompt_enhancer=True)
    assert len(sglang.requests) == 1 and sglang.requests[0]["body"]["n"] == 4
    assert sglang.requests[0]["body"]["use_pe"] is True
    assert out.shape == (4, 48, 64, 3)
    for k in range(4):
        assert torch.equal(out[k], as_image(picture(7, k, 64, 48)))
    assert ticks == [(4, 4)]  # one answer brings the four images


def test_ernie_sizes_and_values_checked_before_any_request(sglang):
    node = N["LetterpressErnieImageRemote"]
    for w, h in ((64, 50), (1000, 64)):
        with pytest.raises(LetterpressError, match="ERNIE-Image needs .* multiple of 16"):
            ernie(sglang.base_url, width=w, height=h)
        assert isinstance(node.VALIDATE_INPUTS(width=w, height=h), str)  # refused at queue time too
    assert node.VALIDATE_INPUTS(width=64, height=48) is True
    with pytest.raises(LetterpressError, match="batch_size 11 is above 10"):
        ernie(sglang.base_url, batch_size=11)
    with pytest.raises(LetterpressError, match="model name is empty"):
        ernie(sglang.base_url, model=" ")
    with pytest.raises(LetterpressError, match="prompt is empty"):
        ernie(sglang.base_url, prompt="  ")
    with pytest.raises(LetterpressError, match="must start with http"):
        ernie("127.0.0.1:30000/v1")
    assert sglang.requests == []


def test_ernie_server_errors_are_clear(sglang):
    base = sglang.base_url
    with pytest.raises(LetterpressError, match=r"HTTP 400: size 64x48 exceeds the maximum"):
        ernie(base, model="too-big")
    with pytest.raises(LetterpressError, match=r"sent a 80x48 image for the 64x48 asked: it cannot do that size"):
        ernie(base, model="wrong-size")
    with pytest.raises(LetterpressError, match=r"sent 3 image\(s\) where 4 were asked"):
        ernie(base, model="short-batch", batch_size=4)
    with pytest.raises(LetterpressError, match="OpenAI images .* format: .*without 'b64_json'"):
        ernie(base, model="url-only")
    with pytest.raises(LetterpressError, match=r"OpenAI images .* format: data\[0\].b64_json is not a picture"):
        ernie(base, model="not-png")
    with pytest.raises(LetterpressError, match="OpenAI images .* format"):
        ernie(base, model="garbage")
    with pytest.raises(LetterpressError, match=r"HTTP 401: invalid api key.*API key"):
        ernie(base, model="needs-key", api_key="wrong")
    with pytest.raises(LetterpressError, match=r"HTTP 404: Not Found.*base URL"):
        ernie(base.replace("/v1", "/elsewhere"))


def test_ernie_timeout(sglang):
    with pytest.raises(LetterpressError, match=r"No answer from .* within 0.3 s"):
        ernie(sglang.base_url, model="slow", timeout=0.3)


def test_ernie_cancel_mid_request_closes_the_connection(sglang, host):
    """The stand-in signals it holds the request; the test then presses Cancel; the node raises Interrupted and
    the stand-in sees its client close the connection."""
    in_thread_when(sglang, lambda s: s.received == 1, host.request_interrupt)
    with pytest.raises(Interrupted):
        ernie(sglang.base_url, model="hold", timeout=3600.0)  # only closing ends it: no timeout will
    assert sglang.wait_for(lambda s: s.closed_by_client == 1)


def test_no_redirect_is_followed_and_nothing_goes_elsewhere(sglang):
    """A 307 to another address is an error: the node sends only to the URL typed (the stand-in's Location,
    port 9, would refuse; the error names the redirect instead)."""
    with pytest.raises(LetterpressError, match=r"HTTP 307 \(redirect to http://127.0.0.1:9/elsewhere\).*no redirect"):
        ernie(sglang.base_url, model="redirect")
    assert len(sglang.requests) == 1


def test_proxy_settings_are_not_used(sglang, monkeypatch):
    """A proxy from the environment would send the request elsewhere: the nodes go straight to the URL typed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{dead}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert ernie(sglang.base_url).shape == (1, 48, 64, 3)


def test_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(LetterpressError, match="Could not reach .*Is the server running"):
        ernie(f"http://127.0.0.1:{port}/v1", timeout=5.0)
    with pytest.raises(LetterpressError, match="Could not reach .*Is the server running"):
        glm(f"http://127.0.0.1:{port}/v1", timeout=5.0)


# GLM-Image on vLLM-Omni -----------------------------------------------------------------------------------


def _refs():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.integers(0, 256, (2, 20, 24, 3)).astype(np.float32) / 255.0)  # two frames
    b = torch.from_numpy(rng.integers(0, 256, (1, 16, 16, 3)).astype(np.float32) / 255.0)
    return a, b


def test_glm_text_to_image_body_is_vllm_omnis_documented_shape(omni):
    out = glm(omni.base_url, api_key="secret")
    req = omni.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer secret"
    # the GLM-Image online-serving example: the prompt as the user message, the image parameters in extra_body
    assert req["body"] == {"model": "zai-org/GLM-Image",
                           "messages": [{"role": "user", "content": "a sign that says \"OPEN\""}],
                           "extra_body": {"height": 96, "width": 64, "num_inference_steps": 50, "guidance_scale": 1.5,
                                          "seed": 3}}
    assert out.shape == (1, 96, 64, 3)
    assert torch.equal(out[0], as_image(picture(3, 0, 64, 96)))


def test_glm_editing_sends_references_as_image_url_parts(omni):
    a, b = _refs()
    glm(omni.base_url, reference_1=a, reference_3=b)
    (user,) = omni.requests[-1]["body"]["messages"]
    content = user["content"]
    assert user["role"] == "user"
    assert content[0] == {"type": "text", "text": "a sign that says \"OPEN\""}  # text first, as the docs' example
    assert [p["type"] for p in content[1:]] == ["image_url"] * 3
    sent = [decode_data_url(p["image_url"]["url"]) for p in content[1:]]
    expected = [np.round(x.numpy() * 255).astype(np.uint8) for x in (a[0], a[1], b[0])]  # frames in order
    assert all(np.array_equal(s, e) for s, e in zip(sent, expected))


def test_glm_references_limited_to_four_before_any_request(omni):
    a, b = _refs()
    with pytest.raises(LetterpressError, match="at most 4 reference images in all, got 5"):
        glm(omni.base_url, reference_1=a, reference_2=a, reference_3=b)
    with pytest.raises(LetterpressError, match="GLM-Image needs width to be a positive multiple of 32"):
        glm(omni.base_url, width=80)
    assert isinstance(N["LetterpressGlmImageRemote"].VALIDATE_INPUTS(width=80, height=64), str)
    assert omni.requests == []


def test_glm_batch_is_concurrent_requests_within_the_limit(omni, host):
    """Four images, at most two in flight: the stand-in holds each request until two are in flight at once (or
    all four have come), so a client keeping two open is answered, and the stand-in records the most it ever saw
    in flight. Seeds seed..seed+3, images back in seed order whatever order the answers came in."""
    omni.hold_until, omni.hold_total = 2, 4
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    out = glm(omni.base_url, model="concurrency", batch_size=4, concurrency=2, seed=10)
    assert omni.max_in_flight == 2
    assert sorted(r["body"]["extra_body"]["seed"] for r in omni.requests) == [10, 11, 12, 13]
    for k in range(4):
        assert torch.equal(out[k], as_image(picture(10 + k, 0, 64, 96)))
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one step per finished image


def test_glm_concurrency_one_sends_one_at_a_time(omni):
    omni.hold_until, omni.hold_total = 1, 3
    glm(omni.base_url, model="concurrency", batch_size=3, concurrency=1)
    assert omni.max_in_flight == 1 and omni.received == 3


def test_glm_server_errors_are_clear(omni):
    base = omni.base_url
    with pytest.raises(LetterpressError, match=r"HTTP 404: The model `zai-org/GLM-Imag` does not exist.*model name"):
        glm(base, model="zai-org/GLM-Imag")
    with pytest.raises(LetterpressError, match=r"HTTP 400: Requested image size 64x96 exceeds the maximum"):
        glm(base, model="too-big")
    with pytest.raises(LetterpressError, match=r"sent a 32x96 image for the 64x96 asked"):
        glm(base, model="wrong-size", height=96, width=64)
    with pytest.raises(LetterpressError, match=r"the answer is text, not an image: 'Image generation completed"):
        glm(base, model="text-answer")
    with pytest.raises(LetterpressError, match=r"sent 2 image\(s\) where 1 were asked"):
        glm(base, model="two-images")
    with pytest.raises(LetterpressError, match="vLLM-Omni chat-completions image format: no 'choices'"):
        glm(base, model="no-choices")
    with pytest.raises(LetterpressError, match="vLLM-Omni chat-completions image format"):
        glm(base, model="garbage")
    with pytest.raises(LetterpressError, match=r"HTTP 401: invalid api key"):
        glm(base, model="needs-key")


def test_glm_timeout(omni):
    with pytest.raises(LetterpressError, match=r"No answer from .* within 0.3 s"):
        glm(omni.base_url, model="slow", timeout=0.3)


def test_glm_cancel_mid_request_closes_every_connection(omni, host):
    """Two requests held by the stand-in; Cancel once both have arrived: Interrupted, both connections closed,
    and the other two images of the batch are never asked for."""
    in_thread_when(omni, lambda s: s.received == 2, host.request_interrupt)
    with pytest.raises(Interrupted):
        glm(omni.base_url, model="hold", batch_size=4, concurrency=2, timeout=3600.0)
    assert omni.wait_for(lambda s: s.closed_by_client == 2)
    assert omni.received == 2


# The shipped remote workflows, headless -------------------------------------------------------------------


def test_ernie_remote_best_of_4_workflow_runs_headless(sglang):
    pytest.importorskip("rapidocr")
    from letterpress.runner import Runner, load_workflow, set_values

    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "ernie_image_remote_best_of_4_api.json"))
    (nid,) = [k for k, n in wf.items() if n["class_type"] == "LetterpressErnieImageRemote"]
    wf = set_values(wf, [f"{nid}.base_url={sglang.base_url}", f"{nid}.width=64", f"{nid}.height=64"])
    results = Runner().run(wf)["results"]
    body = sglang.requests[-1]["body"]
    assert body["n"] == 4 and body["model"] == "baidu/ERNIE-Image-Turbo"
    assert results[nid][0].shape == (4, 64, 64, 3)
    best = next(k for k, n in wf.items() if n["class_type"] == "LetterpressTextBestOfBatch")
    picked = results[best][0]
    assert picked.shape == (1, 64, 64, 3)
    assert any(torch.equal(picked[0], results[nid][0][k]) for k in range(4))  # one of the four, unchanged


def test_glm_remote_edit_workflow_runs_headless(omni, host, tmp_path):
    from letterpress.runner import Runner, load_workflow, set_values

    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "glm_image_remote_edit_api.json"))
    host.input_dir = str(tmp_path)
    for node in wf.values():
        if node["class_type"] == "LoadImage":
            Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / node["inputs"]["image"])
    (nid,) = [k for k, n in wf.items() if n["class_type"] == "LetterpressGlmImageRemote"]
    wf = set_values(wf, [f"{nid}.base_url={omni.base_url}", f"{nid}.width=64", f"{nid}.height=64"])
    results = Runner().run(wf)["results"]
    (req,) = omni.requests
    parts = req["body"]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    assert np.array_equal(decode_data_url(parts[1]["image_url"]["url"]), np.full((64, 64, 3), (200, 120, 40), np.uint8))
    assert torch.equal(results[nid][0][0], as_image(picture(wf[nid]["inputs"]["seed"], 0, 64, 64)))
