"""ERNIE-Image Remote and GLM-Image Remote against stand-ins written from SGLang Diffusion 0.5.23's and vLLM-Omni
0.30.0's code (tests/fixtures/standin_*.py): every field sent is one the engine reads, each setting reaches it
(a change of seed, guidance, steps, size or reference changes the picture it draws), a batch draws distinct
pictures, a model the server does not serve stops the node before any generation, every server error reads as a
sentence, Cancel mid-request, and the shipped remote workflows run headless. Every wait is an event/condition
handshake with the stand-in, never a sleep or a clock."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
import torch
from fixtures.standin_servers import SGLangDiffusionStandIn, VllmOmniStandIn, picture

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


ERNIE = {"model": "baidu/ERNIE-Image-Turbo", "prompt": "a poster that says \"HELLO\"", "width": 64, "height": 48,
         "steps": 8, "guidance": 1.0, "seed": 7, "batch_size": 1, "prompt_enhancer": False}
GLM = {"model": "zai-org/GLM-Image", "prompt": "a sign that says \"OPEN\"", "width": 64, "height": 96, "steps": 50,
       "guidance": 1.5, "seed": 3, "batch_size": 1, "concurrency": 2}


def ernie(base, timeout=30.0, api_key="", **change):
    a = {**ERNIE, **change}
    return N["LetterpressErnieImageRemote"]().run(base, a["model"], api_key, a["prompt"], a["width"], a["height"],
                                                  a["steps"], a["guidance"], a["seed"], a["batch_size"],
                                                  a["prompt_enhancer"], timeout)[0]


def glm(base, timeout=30.0, api_key="", refs=None, **change):
    a = {**GLM, **change}
    return N["LetterpressGlmImageRemote"]().run(base, a["model"], api_key, a["prompt"], a["width"], a["height"],
                                                a["steps"], a["guidance"], a["seed"], a["batch_size"],
                                                a["concurrency"], timeout, **(refs or {}))[0]


def as_image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0)


def as_pixels(frame: torch.Tensor) -> np.ndarray:
    return np.round(frame.numpy() * 255).astype(np.uint8)


def in_thread_when(srv, predicate, action):
    """Runs `action` once the stand-in reports `predicate` (a handshake, not a delay)."""
    def go():
        if srv.wait_for(predicate):
            action()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def reference(seed: int, frames: int = 1, size=(20, 24)) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (frames, *size, 3)).astype(np.float32) / 255.0)


def all_distinct(images: torch.Tensor) -> bool:
    return all(not torch.equal(images[i], images[j]) for i in range(len(images)) for j in range(i))


# ERNIE-Image on SGLang Diffusion --------------------------------------------------------------------------


def test_ernie_settings_reach_sglang_where_its_code_reads_them(sglang):
    out = ernie(sglang.base_url, api_key="secret")
    look_up, request = sglang.requests
    assert (look_up["method"], look_up["path"]) == ("GET", "/v1/models")  # the model check comes first
    assert (request["method"], request["path"]) == ("POST", "/v1/images/generations")
    assert request["headers"]["Authorization"] == "Bearer secret"
    # SGLang reads every field sent but `model`, which it accepts and never checks (the node checked it above)
    assert sglang.ignored == ["model"]
    (drawn,) = sglang.drawn
    assert drawn == {"prompt": ERNIE["prompt"], "seed": 7, "steps": 8, "guidance": 1.0, "width": 64, "height": 48,
                     "use_pe": False}
    assert out.shape == (1, 48, 64, 3) and out.dtype == torch.float32
    assert torch.equal(out[0], as_image(picture(drawn)))  # the server's exact pixels


def test_ernie_batch_is_one_request_of_n_distinct_pictures(sglang, host):
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    out = ernie(sglang.base_url, batch_size=4, prompt_enhancer=True)
    assert len(sglang.generations()) == 1
    assert [d["seed"] for d in sglang.drawn] == [7, 8, 9, 10]  # SGLang: output k has seed + k
    assert all(d["use_pe"] is True for d in sglang.drawn)
    assert out.shape == (4, 48, 64, 3) and all_distinct(out)
    for k, drawn in enumerate(sglang.drawn):
        assert torch.equal(out[k], as_image(picture(drawn)))
    assert ticks == [(4, 4)]  # one answer brings the four images


@pytest.mark.parametrize("change", [{"seed": 8}, {"guidance": 2.5}, {"steps": 9}, {"width": 80}, {"height": 32},
                                    {"prompt_enhancer": True}], ids=lambda c: next(iter(c)))
def test_ernie_each_setting_changes_the_picture(sglang, change):
    first, second = ernie(sglang.base_url), ernie(sglang.base_url, **change)
    assert first.shape != second.shape or not torch.equal(first, second)
    key = {"prompt_enhancer": "use_pe"}.get(next(iter(change)), next(iter(change)))
    assert sglang.drawn[-1][key] == next(iter(change.values()))


def test_ernie_wrong_model_name_stops_before_any_generation(sglang):
    with pytest.raises(LetterpressError) as e:
        ernie(sglang.base_url, model="baidu/ERNIE-Image-Turb")
    assert str(e.value) == (f"The server at {sglang.base_url} serves 'baidu/ERNIE-Image-Turbo', not "
                            "'baidu/ERNIE-Image-Turb'. Set model_name to the name it serves (its --served-model-name, "
                            "else its model path).")
    assert sglang.generations() == [] and sglang.drawn == []


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


@pytest.mark.parametrize("mode, match", [
    ("too-big", r"HTTP 400: size 64x48 exceeds the maximum the pipeline supports\.$"),
    ("wrong-size", r"sent a 80x48 image for the 64x48 asked: it cannot do that size"),
    ("url-only", r"OpenAI images .* format: an image came without 'b64_json'"),
    ("not-png", r"OpenAI images .* format: data\[0\].b64_json is not a picture"),
    ("garbage", r"did not answer in the OpenAI images \(b64_json\) format"),
])
def test_ernie_server_faults_are_clear(sglang, mode, match):
    sglang.mode = mode
    with pytest.raises(LetterpressError, match=match):
        ernie(sglang.base_url)


def test_ernie_short_batch_is_an_error(sglang):
    sglang.mode = "short-batch"
    with pytest.raises(LetterpressError, match=r"sent 3 image\(s\) where 4 were asked"):
        ernie(sglang.base_url, batch_size=4)


def test_ernie_timeout(sglang):
    sglang.mode = "slow"
    with pytest.raises(LetterpressError, match=r"No answer from .* within 0.3 s"):
        ernie(sglang.base_url, timeout=0.3)


def test_ernie_cancel_mid_request_closes_the_connection(sglang, host):
    """The stand-in signals it holds the request; the test then presses Cancel; the node raises Interrupted and
    the stand-in sees its client close the connection."""
    sglang.mode = "hold"
    in_thread_when(sglang, lambda s: s.received == 1, host.request_interrupt)
    with pytest.raises(Interrupted):
        ernie(sglang.base_url, timeout=3600.0)  # only closing ends it: no timeout will
    assert sglang.wait_for(lambda s: s.closed_by_client == 1)


def test_no_redirect_is_followed_and_nothing_goes_elsewhere(sglang):
    """A 307 to another address is an error: the node sends only to the URL typed (the stand-in's Location,
    port 9, would refuse; the error names the redirect instead)."""
    sglang.mode = "redirect"
    with pytest.raises(LetterpressError, match=r"HTTP 307 \(redirect to http://127.0.0.1:9/elsewhere\).*no redirect"):
        ernie(sglang.base_url)
    assert len(sglang.generations()) == 1


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


def test_glm_text_to_image_settings_reach_both_stages(omni):
    out = glm(omni.base_url, api_key="secret")
    look_up, request = omni.requests
    assert (look_up["method"], look_up["path"]) == ("GET", "/v1/models")
    assert (request["method"], request["path"]) == ("POST", "/v1/images/generations")
    assert request["headers"]["Authorization"] == "Bearer secret"
    assert omni.ignored == []  # nothing sent that vLLM-Omni drops
    (drawn,) = omni.drawn
    assert drawn == {"prompt": GLM["prompt"], "ar_seed": 3, "seed": 3, "steps": 50, "guidance": 1.5, "width": 64,
                     "height": 96}
    assert out.shape == (1, 96, 64, 3)
    assert torch.equal(out[0], as_image(picture(drawn)))


def test_glm_editing_sends_the_reference_to_images_edits(omni):
    ref = reference(1)
    out = glm(omni.base_url, refs={"reference_2": ref}, guidance=3.0)
    request = omni.generations()[0]
    assert request["path"] == "/v1/images/edits"
    assert request["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert omni.ignored == []
    (drawn,) = omni.drawn
    assert np.array_equal(drawn.pop("reference"), as_pixels(ref[0]))
    assert drawn == {"prompt": GLM["prompt"], "ar_seed": 3, "seed": 3, "steps": 50, "guidance": 3.0, "width": 64,
                     "height": 96}
    assert out.shape == (1, 96, 64, 3)


def test_glm_more_references_than_the_server_takes_are_refused_before_sending(omni):
    with pytest.raises(LetterpressError, match=r"got 2 reference images .* vLLM-Omni takes 1 for GLM-Image"):
        glm(omni.base_url, refs={"reference_1": reference(1, frames=2)})
    with pytest.raises(LetterpressError, match=r"got 2 reference images"):
        glm(omni.base_url, refs={"reference_1": reference(1), "reference_4": reference(2)})
    with pytest.raises(LetterpressError, match="GLM-Image needs width to be a positive multiple of 32"):
        glm(omni.base_url, width=80)
    assert isinstance(N["LetterpressGlmImageRemote"].VALIDATE_INPUTS(width=80, height=64), str)
    assert omni.requests == []


@pytest.mark.parametrize("change", [{"seed": 4}, {"guidance": 2.0}, {"steps": 30}, {"width": 96}, {"height": 64},
                                    {"refs": {"reference_1": reference(2)}}], ids=lambda c: next(iter(c)))
def test_glm_each_setting_changes_the_picture(omni, change):
    base = {"refs": {"reference_1": reference(1)}}
    first, second = glm(omni.base_url, **base), glm(omni.base_url, **{**base, **change})
    assert first.shape != second.shape or not torch.equal(first, second)
    key, value = next(iter(change.items()))
    if key == "refs":
        assert np.array_equal(omni.drawn[-1]["reference"], as_pixels(value["reference_1"][0]))
    else:
        assert omni.drawn[-1][key] == value


def test_glm_batch_is_concurrent_requests_of_distinct_pictures(omni, host):
    """Four images, at most two in flight: the stand-in holds each request until two are in flight at once (or
    all four have come), so a client keeping two open is answered, and the stand-in records the most it ever saw
    in flight. Seeds seed..seed+3 on both stages, images back in seed order whatever order the answers came in."""
    omni.mode, omni.hold_until, omni.hold_total = "concurrency", 2, 4
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    out = glm(omni.base_url, batch_size=4, concurrency=2, seed=10)
    assert omni.max_in_flight == 2
    assert sorted((d["ar_seed"], d["seed"]) for d in omni.drawn) == [(10, 10), (11, 11), (12, 12), (13, 13)]
    assert all_distinct(out)
    by_seed = {d["seed"]: d for d in omni.drawn}
    for k in range(4):
        assert torch.equal(out[k], as_image(picture(by_seed[10 + k])))
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one step per finished image


def test_glm_concurrency_one_sends_one_at_a_time(omni):
    omni.mode, omni.hold_until, omni.hold_total = "concurrency", 1, 3
    glm(omni.base_url, batch_size=3, concurrency=1)
    assert omni.max_in_flight == 1 and omni.received == 3


def test_glm_wrong_model_name_stops_before_any_generation(omni):
    with pytest.raises(LetterpressError, match=r"serves 'zai-org/GLM-Image', not 'zai-org/GLM-Imag'\. Set model_name"):
        glm(omni.base_url, model="zai-org/GLM-Imag", batch_size=3)
    assert omni.generations() == []


@pytest.mark.parametrize("mode, match", [
    ("wrong-size", r"sent a 32x96 image for the 64x96 asked"),
    ("two-images", r"sent 2 image\(s\) where 1 were asked"),
    ("no-data", r"OpenAI images \(b64_json\) format: no 'data' list"),
    ("garbage", r"did not answer in the OpenAI images \(b64_json\) format"),
])
def test_glm_server_faults_are_clear(omni, mode, match):
    omni.mode = mode
    with pytest.raises(LetterpressError, match=match):
        glm(omni.base_url)


def test_glm_server_refusals_read_as_sentences(omni):
    """The server's own sentence ends the node's once: no doubled full stop before the hint."""
    omni.max_pixels = 1000
    with pytest.raises(LetterpressError) as e:
        glm(omni.base_url)
    assert str(e.value) == (f"The server at {omni.base_url}/images/generations answered HTTP 400: Requested image size "
                            "64x96 exceeds the maximum allowed size of 1000 pixels. You can reduce the requested size "
                            "or increase the server's --max-generated-image-size limit.")
    omni.api_key = "secret"
    with pytest.raises(LetterpressError) as e:
        glm(omni.base_url, api_key="wrong")
    assert str(e.value) == f"The server at {omni.base_url}/models answered HTTP 401: Unauthorized. Check the API key."
    with pytest.raises(LetterpressError) as e:
        glm(omni.base_url.replace("/v1", "/elsewhere"), api_key="secret")
    assert ".." not in str(e.value) and str(e.value).startswith(
        f"The server at {omni.base_url.replace('/v1', '/elsewhere')}/models answered HTTP 404: Not Found. Check the base URL")


def test_glm_timeout(omni):
    omni.mode = "slow"
    with pytest.raises(LetterpressError, match=r"No answer from .* within 0.3 s"):
        glm(omni.base_url, timeout=0.3)


def test_glm_cancel_mid_request_closes_every_connection(omni, host):
    """Two requests held by the stand-in; Cancel once both have arrived: Interrupted, both connections closed,
    and the other two images of the batch are never asked for."""
    omni.mode = "hold"
    in_thread_when(omni, lambda s: s.received == 2, host.request_interrupt)
    with pytest.raises(Interrupted):
        glm(omni.base_url, batch_size=4, concurrency=2, timeout=3600.0)
    assert omni.wait_for(lambda s: s.closed_by_client == 2)
    assert omni.received == 2


# The shipped remote workflows, headless -------------------------------------------------------------------


def _workflow(name: str, node_type: str, srv) -> tuple[dict, str]:
    from letterpress.runner import load_workflow, set_values

    wf = load_workflow(os.path.join(ROOT, "workflows", "api", name))
    (nid,) = [k for k, n in wf.items() if n["class_type"] == node_type]
    return set_values(wf, [f"{nid}.base_url={srv.base_url}", f"{nid}.width=64", f"{nid}.height=64"]), nid


def test_ernie_remote_best_of_4_workflow_runs_headless(sglang):
    pytest.importorskip("rapidocr")
    from letterpress.runner import Runner

    wf, nid = _workflow("ernie_image_remote_best_of_4_api.json", "LetterpressErnieImageRemote", sglang)
    results = Runner().run(wf)["results"]
    inputs = wf[nid]["inputs"]
    assert sglang.ignored == ["model"]
    assert [(d["seed"], d["steps"], d["guidance"], d["use_pe"]) for d in sglang.drawn] == [
        (inputs["seed"] + k, inputs["steps"], inputs["guidance"], inputs["prompt_enhancer"]) for k in range(4)]
    assert results[nid][0].shape == (4, 64, 64, 3) and all_distinct(results[nid][0])
    best = next(k for k, n in wf.items() if n["class_type"] == "LetterpressTextBestOfBatch")
    picked = results[best][0]
    assert picked.shape == (1, 64, 64, 3)
    assert any(torch.equal(picked[0], results[nid][0][k]) for k in range(4))  # one of the four, unchanged


def test_glm_remote_edit_workflow_runs_headless(omni, host, tmp_path):
    from PIL import Image

    from letterpress.runner import Runner

    wf, nid = _workflow("glm_image_remote_edit_api.json", "LetterpressGlmImageRemote", omni)
    host.input_dir = str(tmp_path)
    for node in wf.values():
        if node["class_type"] == "LoadImage":
            Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / node["inputs"]["image"])
    results = Runner().run(wf)["results"]
    inputs = wf[nid]["inputs"]
    assert omni.ignored == [] and [r["path"] for r in omni.generations()] == ["/v1/images/edits"]
    (drawn,) = omni.drawn
    assert np.array_equal(drawn["reference"], np.full((64, 64, 3), (200, 120, 40), np.uint8))
    assert (drawn["seed"], drawn["ar_seed"], drawn["steps"], drawn["guidance"]) == (
        inputs["seed"], inputs["seed"], inputs["steps"], inputs["guidance"])
    assert torch.equal(results[nid][0][0], as_image(picture(drawn)))
