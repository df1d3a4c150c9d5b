"""The pack inside real ComfyUI releases (CPU): /object_info, every API workflow through POST /prompt, Cancel
through /interrupt, caching on re-queue, and ComfyUI's memory manager holding, streaming and freeing the models.

Every test runs once per release: the ComfyUI trees in COMFYUI_PATH (several joined with os.pathsep), else every
release under ../shared/comfyui/ beside the project (0.3.64, 0.8.0 and 0.33.0 in this workplace). ComfyUI's own
requirements must be installed (the `test` extra does it); a release that does not start fails its tests with the
end of its log. Skips only when no ComfyUI tree is found at all.

One Python environment serves every release, except the editor: a release whose requirements.txt pins a newer
frontend than the installed comfyui-frontend-package is started with --front-end-root on a frontend installed beside
the project (.comfyui-frontends/<version>, which the tests install with pip the first time; COMFYUI_FRONTENDS names
another folder). A release for which none can be installed fails its tests, saying so.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest
from fixtures.common import workflow_inputs
from prompt_api import StartError, start, watch
from prompt_api import view_image as _image
from test_workflows import api_twin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONTENDS = os.environ.get("COMFYUI_FRONTENDS", os.path.join(ROOT, ".comfyui-frontends"))


def _releases() -> list[str]:
    given = [p for p in os.environ.get("COMFYUI_PATH", "").split(os.pathsep) if p]
    for p in given:  # named explicitly (as .ci/run does): a tree that is not there is an error, not a skip
        if not os.path.exists(os.path.join(p, "main.py")):
            raise RuntimeError(f"COMFYUI_PATH names {p}, which is not a ComfyUI tree (no main.py)")
    found = given or sorted(glob.glob(os.path.join(ROOT, "..", "shared", "comfyui", "*")))
    return [os.path.realpath(p) for p in found if os.path.exists(os.path.join(p, "main.py"))]


RELEASES = _releases()
pytestmark = pytest.mark.skipif(
    not RELEASES, reason="no ComfyUI tree: set COMFYUI_PATH to one (or several, joined with os.pathsep)")

# A test-only custom node that reports ComfyUI's loaded models, so the test can see the memory manager.
PROBE = '''
import comfy.model_management as mm

class LetterpressTestLoadedModels:
    CATEGORY = "testing"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2**31})},
                "optional": {"after": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, nonce, after=None):
        return float("nan")

    def run(self, nonce, after=None):
        patchers = [m.model for m in mm.current_loaded_models if m.model is not None]
        names = [type(p.model.inner).__name__ for p in patchers if hasattr(p.model, "inner")]
        return {"ui": {"text": [",".join(names)]}, "result": (",".join(names),)}

class LetterpressTestLowVram:
    """Runs the ERNIE DiT (with whatever LoRA its patcher carries) fully loaded, then loaded by ModelPatcher with a
    weight budget of a third of its size (ComfyUI's lowvram load: the rest streamed per layer, LoRAs applied by its
    LowVramPatch at forward time), and reports both."""
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dit": ("LP_ERNIE_DIT",)}}

    def run(self, dit):
        import json

        import torch

        patcher, model = dit.patcher, dit.module
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, model.config.in_channels, 4, 4, generator=gen)
        text = torch.randn(1, 3, model.config.text_in_dim, generator=gen)
        args = dict(hidden_states=x, timestep=torch.tensor([500.0]), text_bth=text, text_lens=torch.tensor([3]),
                    return_dict=False)
        mm.load_models_gpu([patcher])
        with torch.no_grad():
            full = model(**args)[0]
        report = {"scale": float(full.abs().max())}
        for label, budget in (("third", patcher.model_size() // 3), ("none", 1)):
            mm.unload_all_models()
            patcher.patch_model(device_to=mm.get_torch_device(), lowvram_model_memory=budget)  # as LoadedModel does
            castable = [m for m in model.modules()  # layers with weights (a norm without any has nothing to stream)
                        if hasattr(m, "comfy_cast_weights") and any(True for _ in m.parameters(recurse=False))]
            streamed = [m for m in castable if m.comfy_cast_weights]
            lora = [m for m in streamed  # ComfyUI's patches, and the pack's LoRAs on packed layers (weight wrappers)
                    if any(type(f).__name__ in ("LowVramPatch", "PackedLora") for f in m.weight_function)]
            with torch.no_grad():
                low = model(**args)[0]
            patcher.unpatch_model(patcher.offload_device)
            report[label] = {"layers": len(castable), "streamed": len(streamed), "lora_streamed": len(lora),
                             "diff": float((full - low).abs().max()), "sample": low.flatten()[:8].tolist()}
        return {"ui": {"text": [json.dumps(report)]}}


LOAD_REQUESTS = []
_load_models_gpu = mm.load_models_gpu


def _recording_load_models_gpu(models, memory_required=0, *args, **kwargs):
    names = [type(getattr(m.model, "inner", m.model)).__name__ for m in models if hasattr(m, "model")]
    LOAD_REQUESTS.append([names, memory_required])
    return _load_models_gpu(models, memory_required, *args, **kwargs)


mm.load_models_gpu = _recording_load_models_gpu


class LetterpressTestText:
    """Shows a STRING (and the sizes ComfyUI's memory manager counts for the models it holds) in the history."""
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    def run(self, text):
        import json

        sizes = {type(m.model.model.inner).__name__: m.model.model_size() for m in mm.current_loaded_models
                 if m.model is not None and hasattr(m.model.model, "inner")}
        return {"ui": {"text": [text, json.dumps(sizes)]}}


class LetterpressTestLoadRequests(LetterpressTestLoadedModels):
    """What load_models_gpu was asked since the last run of this node: [[model classes], memory_required]."""

    def run(self, nonce, after=None):
        import json

        text = json.dumps(LOAD_REQUESTS)
        LOAD_REQUESTS.clear()
        return {"ui": {"text": [text]}, "result": (text,)}


import comfy.utils

INTERRUPT_AT = {}
_update_absolute = comfy.utils.ProgressBar.update_absolute


def _interrupting_update_absolute(self, value, total=None, preview=None):
    _update_absolute(self, value, total, preview)
    if INTERRUPT_AT.get(self.total) == value:  # as the Cancel button would, right after that progress tick
        INTERRUPT_AT.clear()
        mm.interrupt_current_processing(True)


comfy.utils.ProgressBar.update_absolute = _interrupting_update_absolute


class LetterpressTestInterruptAt:
    """Arms an interrupt for the next progress bar of `total` steps when it reaches step `at` (no timing)."""
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"total": ("INT", {"default": 1, "min": 1, "max": 100000}),
                             "at": ("INT", {"default": 1, "min": 1, "max": 100000})}}

    @classmethod
    def IS_CHANGED(cls, total, at):
        return float("nan")

    def run(self, total, at):
        INTERRUPT_AT[total] = at
        return {"ui": {"text": ["armed"]}}


NODE_CLASS_MAPPINGS = {"LetterpressTestLoadedModels": LetterpressTestLoadedModels,
                       "LetterpressTestText": LetterpressTestText,
                       "LetterpressTestLowVram": LetterpressTestLowVram,
                       "LetterpressTestLoadRequests": LetterpressTestLoadRequests,
                       "LetterpressTestInterruptAt": LetterpressTestInterruptAt}
'''


def release_name(path: str) -> str:
    version = os.path.join(path, "comfyui_version.py")
    if os.path.exists(version):
        for line in open(version):
            if line.startswith("__version__"):
                return "comfyui-" + line.split("=")[1].strip().strip("\"'")
    return os.path.basename(path)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


NEWER_FRONTEND = "1.49.6"  # the frontend the 0.33 line ships, for releases newer than the installed package


def _install_frontend(version: str, release: str, required: str, installed: str) -> str:
    """Install comfyui-frontend-package==`version` beside the project (once; pip, as the test extra itself)."""
    target = os.path.join(FRONTENDS, version)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                          f"comfyui-frontend-package=={version}"], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"ComfyUI at {release} needs comfyui-frontend-package>={required} (installed: {installed}), and "
                    f"installing {version} into {target} failed: {out.stderr.strip()[-500:]}")
    return version


def frontend_for(release: str) -> tuple[str | None, str]:
    """(--front-end-root, or None for the installed package; the frontend version the release will serve): the
    installed comfyui-frontend-package when it is not older than the release's requirements.txt pin (ComfyUI's own
    check), else the oldest frontend under FRONTENDS that is not, else NEWER_FRONTEND installed there."""
    from importlib.metadata import PackageNotFoundError, version

    pins = re.findall(r"^comfyui-frontend-package==(\S+)", open(os.path.join(release, "requirements.txt")).read(), re.M)
    required = pins[0] if pins else "0"
    try:
        installed = version("comfyui-frontend-package")
    except PackageNotFoundError:
        installed = "0"
    if _version(installed) >= _version(required):
        return None, installed
    found = sorted((_version(name), name) for name in (os.listdir(FRONTENDS) if os.path.isdir(FRONTENDS) else [])
                   if os.path.isdir(os.path.join(FRONTENDS, name, "comfyui_frontend_package", "static"))
                   and _version(name) >= _version(required))
    if not found:
        found = [(_version(NEWER_FRONTEND), _install_frontend(NEWER_FRONTEND, release, required, installed))]
    name = found[0][1]
    return os.path.join(FRONTENDS, name, "comfyui_frontend_package", "static"), name


@pytest.fixture(scope="module", params=RELEASES, ids=[release_name(p) for p in RELEASES])
def comfy(request, shipped_models, models_dir, tmp_path_factory):
    COMFYUI = request.param
    base = tmp_path_factory.mktemp("comfy_base")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    os.symlink(ROOT, nodes / "ComfyUI-Letterpress")
    (nodes / "letterpress_test_probe.py").write_text(PROBE)
    os.symlink(models_dir, base / "models")
    inputs = base / "input"
    workflow_inputs(str(inputs), glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json")))
    front_end_root, c_frontend = frontend_for(COMFYUI)
    started = time.monotonic()
    try:
        c = start(COMFYUI, str(base), ["--cpu", "--preview-method", "auto",
                                       *(["--front-end-root", front_end_root] if front_end_root else [])])
    except StartError as e:
        pytest.fail(str(e))
    c.input_dir = str(inputs)
    c.release = COMFYUI
    c.frontend_version = c_frontend
    print(f"\n{release_name(COMFYUI)} (frontend {c_frontend}) answered {time.monotonic() - started:.0f} s after start")
    try:
        yield c
    finally:
        c.stop()


def small(wf: dict, steps: int = 2, size: int = 64) -> dict:
    wf = json.loads(json.dumps(wf))
    for node in wf.values():
        inputs = node["inputs"]
        for k in ("width", "height"):
            if isinstance(inputs.get(k), int):
                inputs[k] = size
        if node["class_type"] == "PrimitiveInt" and node["_meta"]["title"] in ("Width", "Height"):
            inputs["value"] = size
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
        if isinstance(inputs.get("resolution"), int):
            inputs["resolution"] = size
        if isinstance(inputs.get("max_new_tokens"), int):
            inputs["max_new_tokens"] = 8
    return wf


def messages(entry) -> dict:
    return {m[0]: m[1] for m in entry["status"]["messages"]}


def test_object_info_lists_every_node_with_its_inputs(comfy):
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    info = comfy.get("/object_info")
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, name
        ours = cls.INPUT_TYPES()
        assert set(info[name]["input"]["required"]) == set(ours["required"])
        assert info[name]["output"] == list(cls.RETURN_TYPES)
        assert info[name]["category"].startswith("Letterpress")


@pytest.fixture(scope="module")
def standins():
    """The stand-in engine servers (tests/fixtures/standin_servers.py) on 127.0.0.1, for the Remote workflows:
    ComfyUI's process and the headless runner both reach them there."""
    from fixtures.standin_servers import SGLangDiffusionStandIn, VllmOmniStandIn

    with SGLangDiffusionStandIn() as sglang, VllmOmniStandIn() as omni:
        yield {"LetterpressErnieImageRemote": sglang, "LetterpressGlmImageRemote": omni}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json"))),
                         ids=lambda p: os.path.basename(p))
def test_api_workflow_queues_and_draws_what_the_headless_runner_draws(comfy, host, standins, path):
    """Every shipped workflow through POST /prompt draws, to the PNG's rounding, the image the headless runner draws
    from the same file and seeds, which the parity tests hold to the reference pipelines. A Remote workflow's
    base_url points at its stand-in server (deterministic pictures), so both runs ask it the same."""
    import numpy as np

    from letterpress.runner import Runner

    wf = small(json.load(open(path)))
    for node in wf.values():
        if node["class_type"] in standins:
            node["inputs"]["base_url"] = standins[node["class_type"]].base_url
    if any(n["class_type"] == "LetterpressTextRead" for n in wf.values()):
        pytest.importorskip("rapidocr")
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    host.input_dir = comfy.input_dir
    results = Runner().run(wf)["results"]
    saved = [nid for nid, node in wf.items() if node["class_type"] == "SaveImage"]
    assert saved
    for nid in saved:
        src, index = wf[nid]["inputs"]["images"]
        headless = np.clip(255.0 * results[src][index][0].float().numpy(), 0, 255).astype(np.uint8)  # as SaveImage
        assert np.abs(_image(comfy, entry, nid) - headless.astype(int)).max() <= 1, nid


REMOTE_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*remote*_api.json")))


def _remote(path: str, standins: dict) -> tuple[dict, str, object]:
    """The workflow made small, its Remote node's base_url on the stand-in, and a fresh seed (so no cache)."""
    wf = small(json.load(open(path)))
    (nid,) = [k for k, n in wf.items() if n["class_type"] in standins]
    wf[nid]["inputs"]["base_url"] = standins[wf[nid]["class_type"]].base_url
    wf[nid]["inputs"]["seed"] = int(uuid.uuid4().int % 2**31)
    return wf, nid, standins[wf[nid]["class_type"]]


@pytest.mark.parametrize("path", REMOTE_WORKFLOWS, ids=lambda p: os.path.basename(p))
def test_remote_workflow_settings_reach_the_engine_as_its_code_reads_them(comfy, standins, path):
    """Through POST /prompt: the stand-in (written from the engine's code) draws with the workflow's seed (seed + k
    for the k-th image of a batch, on both GLM-Image stages), steps, guidance and size, reads every field sent but
    the ones its engine never reads (SGLang: `model`), and the pictures of a batch are distinct."""
    if any(n["class_type"] == "LetterpressTextRead" for n in small(json.load(open(path))).values()):
        pytest.importorskip("rapidocr")
    wf, nid, srv = _remote(path, standins)
    drawn, ignored = len(srv.drawn), len(srv.ignored)
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    inputs, new = wf[nid]["inputs"], srv.drawn[drawn:]
    assert sorted(d["seed"] for d in new) == [inputs["seed"] + k for k in range(inputs["batch_size"])]
    for d in new:
        assert (d["steps"], d["guidance"], d["width"], d["height"]) == (
            inputs["steps"], inputs["guidance"], inputs["width"], inputs["height"])
        assert d.get("ar_seed", d["seed"]) == d["seed"]
    unread = {"model"} if srv is standins["LetterpressErnieImageRemote"] else set()  # SGLang never reads `model`
    assert set(srv.ignored[ignored:]) <= unread


@pytest.mark.parametrize("path", REMOTE_WORKFLOWS, ids=lambda p: os.path.basename(p))
def test_remote_workflow_with_a_wrong_model_name_stops_before_any_generation(comfy, standins, path):
    wf, nid, srv = _remote(path, standins)
    wf[nid]["inputs"]["model_name"] += "-typo"
    posts = len(srv.generations())
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "error"
    error = messages(entry)["execution_error"]
    assert error["node_id"] == nid
    assert error["exception_message"].strip() == (
        f"The server at {srv.base_url} serves '{srv.served}', not '{wf[nid]['inputs']['model_name']}'. Set model_name "
        "to the name it serves (its --served-model-name, else its model path).")
    assert len(srv.generations()) == posts


def test_requeue_with_new_seed_uses_the_cache(comfy):
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))))
    comfy.wait(comfy.queue(wf))
    wf["5"]["inputs"]["seed"] += 1
    entry = comfy.wait(comfy.queue(wf))
    cached = set(messages(entry)["execution_cached"]["nodes"])
    assert {"1", "2", "3", "4"} <= cached and "5" not in cached


def test_requeue_keeps_the_enhanced_prompt_and_shows_it(comfy):
    """The prompt enhancer's seed is fixed in the shipped workflow: a new sampler seed re-runs only the DiT
    onwards, and Preview Any shows the rewritten prompt that was encoded."""
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_enhanced_t2i_api.json"))))
    first = comfy.wait(comfy.queue(wf))
    shown = first["outputs"]["11"]["text"][0]
    assert shown and shown != wf["4"]["inputs"]["prompt"]
    wf["8"]["inputs"]["seed"] += 1
    entry = comfy.wait(comfy.queue(wf))
    cached = set(messages(entry)["execution_cached"]["nodes"])
    assert {"1", "4", "5", "6", "7"} <= cached and "8" not in cached


def test_interrupt_stops_a_run_and_the_next_one_works(comfy):
    """Cancel once DiT Sample has reported its first step over the websocket (as the editor sees it), so the
    interrupt lands in the sampling loop however slow the machine is; the run ends interrupted, the next succeeds."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))), steps=200, size=1024)
    wf["5"]["inputs"]["seed"] = 12345

    async def cancel_in_the_loop():
        client = str(uuid.uuid4())
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{comfy.url}/ws?clientId={client}") as ws:
                pid = (await asyncio.to_thread(comfy.post, "/prompt", {"prompt": wf, "client_id": client}))["prompt_id"]
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            continue
                        raise AssertionError(f"websocket closed: {msg}")
                    event = json.loads(msg.data)
                    if event["type"] == "progress" and event["data"].get("node") == "5":
                        await asyncio.to_thread(comfy.post, "/interrupt")
                        return pid, event["data"]["value"]
                    if event["type"] in ("execution_success", "execution_error"):
                        raise AssertionError(f"the run ended before its first step was reported: {event}")

    pid, step = asyncio.run(cancel_in_the_loop())
    entry = comfy.wait(pid)
    assert step < 200 and "execution_interrupted" in messages(entry)
    again = comfy.wait(comfy.queue(small(wf)))
    assert again["status"]["status_str"] == "success"


def test_memory_manager_holds_the_models_and_free_unloads_them(comfy):
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))))
    wf["99"] = {"class_type": "LetterpressTestLoadedModels", "inputs": {"nonce": 1, "after": ["6", 0]}}
    loaded = comfy.wait(comfy.queue(wf))["outputs"]["99"]["text"][0]
    assert {"ErnieImageTransformer2DModel", "AutoencoderKLFlux2", "Ministral3Model"} <= set(loaded.split(","))
    comfy.post("/free", {"unload_models": True})  # unload only; free_memory would also reset the cache
    # ComfyUI's worker takes the flag when it next wakes, which may be after a prompt queued at once: ask again
    for nonce in range(2, 22):
        wf["99"]["inputs"]["nonce"] = nonce  # the same graph again: everything cached but the probe
        entry = comfy.wait(comfy.queue(wf))
        if entry["outputs"]["99"]["text"][0] == "":
            break
        time.sleep(0.25)
    assert "6" in messages(entry)["execution_cached"]["nodes"]
    assert entry["outputs"]["99"]["text"][0] == ""


def test_dit_and_vae_loads_ask_comfyui_for_their_working_memory(comfy):
    """DiT Sample and VAE Decode pass their activation estimate as load_models_gpu's memory_required (as ComfyUI's
    KSampler and VAE Decode do), so ComfyUI makes room for it; a bigger image asks for more."""
    def requests(size):
        wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))), size=size)
        wf["99"] = {"class_type": "LetterpressTestLoadRequests", "inputs": {"nonce": size, "after": ["6", 0]}}
        wf["98"] = {"class_type": "LetterpressTestLoadRequests", "inputs": {"nonce": size}}  # clears older ones
        comfy.wait(comfy.queue({"98": wf["98"]}))
        text = comfy.wait(comfy.queue(wf))["outputs"]["99"]["text"][0]
        return {names[0]: need for names, need in json.loads(text) if len(names) == 1}

    small_run, big_run = requests(32), requests(64)
    for name in ("ErnieImageTransformer2DModel", "AutoencoderKLFlux2"):
        assert 0 < small_run[name] < big_run[name], name


def test_lowvram_streaming_with_a_budget_smaller_than_the_dit_matches_the_full_load(comfy):
    """ModelPatcher's lowvram load with a third of the DiT's size: the layers past the budget stream (cast per call),
    the LoRA on them rides ComfyUI's LowVramPatch, and the output equals the fully loaded (LoRA merged) one; the same
    for a GGUF DiT, whose packed weights stream as they are stored, and its LoRA rides the weight wrapper."""
    def probe(dit_node: dict) -> dict:
        wf = {"1": {"class_type": "LetterpressErnieImageDiTLoader",
                    "inputs": {"dit_name": "ernie-image.safetensors", "weight_dtype": "fp32"}},
              "2": {"class_type": "LetterpressErnieImageLoraLoader",
                    "inputs": {"dit": ["1", 0], "lora_name": "ernie_image_lora.safetensors", "strength": 2.0}},
              "4": {"class_type": "LetterpressErnieImageDiTLoader",
                    "inputs": {"dit_name": "ernie-image-turbo-Q4_K_M.gguf", "weight_dtype": "fp32"}},
              "5": {"class_type": "LetterpressErnieImageLoraLoader",
                    "inputs": {"dit": ["4", 0], "lora_name": "ernie_image_lora.safetensors", "strength": 2.0}},
              "3": {"class_type": "LetterpressTestLowVram", "inputs": {"dit": dit_node}}}
        entry = comfy.wait(comfy.queue(wf))
        assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
        return json.loads(entry["outputs"]["3"]["text"][0])

    base, lora, packed, packed_lora = probe(["1", 0]), probe(["2", 0]), probe(["4", 0]), probe(["5", 0])
    for r in (base, lora, packed, packed_lora):  # packed: a GGUF DiT, whose layers dequantize what ComfyUI streams
        assert 0 < r["third"]["streamed"] < r["third"]["layers"]  # some layers within the budget, the rest streamed
        assert r["none"]["streamed"] == r["none"]["layers"]  # a budget of nothing: every layer streams
        assert r["third"]["diff"] <= 1e-5 * r["scale"] and r["none"]["diff"] <= 1e-5 * r["scale"]
    assert base["none"]["lora_streamed"] == 0 < lora["none"]["lora_streamed"]
    assert max(abs(a - b) for a, b in zip(base["none"]["sample"], lora["none"]["sample"])) > 1e-3  # LoRA applied
    # on the packed layers, the LoRA rides the weight wrapper ComfyUI puts in weight_function, streamed or not
    assert packed["none"]["lora_streamed"] == 0 < packed_lora["none"]["lora_streamed"]
    assert max(abs(a - b) for a, b in zip(packed["none"]["sample"], packed_lora["none"]["sample"])) > 1e-3


def test_lora_on_a_gguf_dit_inside_comfyui_draws_what_the_headless_runner_draws(comfy, host):
    """The GGUF workflow with a LoRA chained on its DiT: ComfyUI keeps the LoRA off the packed weights (applied at
    forward time), and the image equals the headless runner's; without the LoRA it differs."""
    import numpy as np

    from letterpress.runner import Runner

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_turbo_gguf_api.json"))))
    plain = _image(comfy, comfy.wait(comfy.queue(wf)), "7")
    wf["10"] = {"class_type": "LetterpressErnieImageLoraLoader",
                "inputs": {"dit": ["1", 0], "lora_name": "ernie_image_lora.safetensors", "strength": 2.0}}
    wf["5"]["inputs"]["dit"] = ["10", 0]
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    with_lora = _image(comfy, entry, "7")
    headless = Runner().run(wf)["results"]["6"][0][0]
    headless = np.clip(255.0 * headless.float().numpy(), 0, 255).astype(np.uint8).astype(int)
    assert np.abs(with_lora - headless).max() <= 1
    assert np.abs(with_lora - plain).max() > 2


QUANTIZED_WORKFLOWS = ["ernie_image_enhanced_t2i_api.json", "ovis_image_t2i_api.json", "glm_image_t2i_api.json",
                       "ernie_vl_image_to_prompt_to_image_api.json"]


@pytest.mark.parametrize("name,choice", [(n, "Q8_0") for n in QUANTIZED_WORKFLOWS] + [(QUANTIZED_WORKFLOWS[0], "Q4_0")])
def test_every_stage_quantized_at_load_draws_what_the_headless_runner_draws(comfy, host, name, choice):
    """Each family's workflow with every loader's weight_dtype a GGUF type (its Linear weights quantized as they are
    read, kept packed under ModelPatcher): the image equals the headless runner's, which tests/test_quantize_at_load.py
    holds to the reference pipelines on the dequantized weights; and it differs from the unquantized image."""
    import numpy as np

    from letterpress.runner import Runner

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", name))))
    saved = next(nid for nid, node in wf.items() if node["class_type"] == "SaveImage")
    plain = _image(comfy, comfy.wait(comfy.queue(wf)), saved)
    loaders = [node for node in wf.values() if "weight_dtype" in node["inputs"]]
    assert loaders
    for node in loaders:
        node["inputs"]["weight_dtype"] = choice
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    quantized = _image(comfy, entry, saved)
    host.input_dir = comfy.input_dir
    src, index = wf[saved]["inputs"]["images"]
    headless = Runner().run(wf)["results"][src][index][0]
    headless = np.clip(255.0 * headless.float().numpy(), 0, 255).astype(np.uint8).astype(int)
    assert np.abs(quantized - headless).max() <= 1
    assert np.abs(quantized - plain).max() > 1  # the quantized weights are what drew it


def test_progress_moves_and_previews_reach_the_browser(comfy):
    """Over ComfyUI's websocket, as the editor sees it: DiT Sample's progress goes 1..steps and each step sends a
    preview image (the server runs with --preview-method auto)."""
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))), steps=3)
    wf["5"]["inputs"]["seed"] = 31337  # not served from the cache
    events, binary = watch(comfy, wf)
    progress = [e["data"]["value"] for e in events if e["type"] == "progress" and e["data"].get("node") == "5"]
    assert progress[-3:] == [1, 2, 3]
    assert sum(kind in (1, 4) for kind, _ in binary) >= 3  # PREVIEW_IMAGE(_WITH_METADATA)


def test_training_shows_its_loss_and_layers_as_progress_text(comfy):
    """Train LoRA's progress text reaches the browser (ComfyUI's TEXT message for the node, as its own nodes send
    it): the layers and parameters trained, then each step's loss and running average."""
    import struct

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_train_lora_api.json"))))
    wf["3"]["inputs"].update(steps=3, seed=9191)  # not served from the cache
    events, binary = watch(comfy, wf)
    assert events[-1]["type"] != "execution_error", events[-1]
    texts = []
    for kind, payload in binary:
        if kind == 3:  # TEXT: node id length, node id, text
            n = struct.unpack(">I", payload[:4])[0]
            texts.append((payload[4: 4 + n].decode(), payload[4 + n:].decode()))
    shown = [t for node, t in texts if node == "3"]
    assert shown[0].startswith("training 8 layers, ") and "(layers / parameters: attention 8 / " in shown[0]
    assert [t.split("  loss")[0] for t in shown[1:]] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("  avg " in t for t in shown[1:])


def _declared_inputs(info: dict):
    """node -> the inputs of an API node that the server (its /object_info `info`) declares: a newer editor adds its
    own widgets (e.g. Preview Any's previewMode), which the server ignores."""
    def declared(node: dict) -> dict:
        spec = info[node["class_type"]]["input"]
        return {k: v for k, v in node["inputs"].items() if k in {*spec.get("required", {}), *spec.get("optional", {})}}

    return declared


def test_ui_workflows_open_in_the_editor_and_queue_as_their_api_twins(comfy):
    """In the real frontend (Debian's chromium through playwright): every UI workflow loads with no missing
    node, and the prompt the editor would queue equals the API twin."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright for the editor test")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("the editor test needs Debian's chromium at /usr/bin/chromium")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    ui_files = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
    declared = _declared_inputs(comfy.get("/object_info"))

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(comfy.url, wait_until="domcontentloaded")
        # Wait for what each step needs, never a fixed time (a loaded machine is slower): the editor up with the
        # server's node definitions registered, then each workflow's nodes all in the graph.
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                               " && 'LetterpressErnieImageTextEncode' in window.LiteGraph.registered_node_types",
                               polling=250, timeout=120000)
        assert page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == comfy.frontend_version  # the one named
        for path in ui_files:
            ui = json.load(open(path))
            page.evaluate("([ui, name]) => window.app.loadGraphData(ui, true, true, name)", [ui, os.path.basename(path)])
            try:  # polled on a timer, not per animation frame (a starved headless browser may draw no frames)
                page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(ui["nodes"]),
                                       polling=250, timeout=120000)
            except sync_api.TimeoutError:
                seen = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
                raise AssertionError(f"{path}: {len(ui['nodes'])} nodes expected in the editor's graph, it holds "
                                     f"{len(seen)} after 120 s: {seen}") from None
            result = page.evaluate("""async () => {
                const missing = window.app.graph._nodes
                    .filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
                return {missing, prompt: (await window.app.graphToPrompt()).output};
            }""")
            assert result["missing"] == [], path
            api = json.load(open(api_twin(path)))
            assert {k: declared(v) for k, v in result["prompt"].items()} == {k: declared(v) for k, v in api.items()}, path
        browser.close()


def test_lora_applies_through_modelpatcher_and_strength_zero_is_the_base(comfy):
    """The LoRA goes through ComfyUI's ModelPatcher patches: a strength changes the image, and strength 0
    run after it gives the base image exactly (the strong patch was taken off the loaded weights)."""
    base_wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))))
    lora_wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_lora_api.json"))))
    for wf in (base_wf, lora_wf):
        wf["5"]["inputs"]["seed"] = 777
    base = _image(comfy, comfy.wait(comfy.queue(base_wf)), "7")
    lora_wf["8"]["inputs"]["strength"] = 3.0
    strong = _image(comfy, comfy.wait(comfy.queue(lora_wf)), "7")
    lora_wf["8"]["inputs"]["strength"] = 0.0
    zero = _image(comfy, comfy.wait(comfy.queue(lora_wf)), "7")
    assert abs(strong - base).max() > 2
    assert (zero == base).all()


def test_ovis_lora_in_comfyui_names_patches_through_modelpatcher(comfy, models_dir):
    """An Ovis-Image LoRA in ComfyUI's own FLUX-style layer names (fused qkv, linear1, SwiGLU halves), converted to
    the DiT's layers and patched by ComfyUI's ModelPatcher, draws what the base file with that LoRA merged into
    its original-name weights draws (to the PNG's rounding)."""
    import torch
    from safetensors.torch import load_file, save_file

    original = load_file(os.path.join(models_dir, "diffusion_models", "ovis_image.safetensors"))
    gen = torch.Generator().manual_seed(3)
    lora = {}
    for t in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.gate_proj", "single_blocks.0.linear1",
              "final_layer.adaLN_modulation.1"):
        w = original[t + ".weight"]
        a, b = 0.3 * torch.randn(2, w.shape[1], generator=gen), 0.3 * torch.randn(w.shape[0], 2, generator=gen)
        lora[f"diffusion_model.{t}.lora_down.weight"], lora[f"diffusion_model.{t}.lora_up.weight"] = a, b
        original[t + ".weight"] = w + 1.5 * (b @ a)  # strength 1.5, alpha = rank
    save_file(lora, os.path.join(models_dir, "loras", "ovis_comfy_names.safetensors"))
    save_file(original, os.path.join(models_dir, "diffusion_models", "ovis_merged_in_comfyui.safetensors"))

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ovis_image_t2i_api.json"))))
    wf["10"] = {"class_type": "LetterpressOvisImageDiTLoader",
                "inputs": {"dit_name": "ovis_image.safetensors", "weight_dtype": "auto"}}
    wf["4"]["inputs"]["dit"] = ["10", 0]
    base = _image(comfy, comfy.wait(comfy.queue(wf)), "6")
    wf["11"] = {"class_type": "LetterpressOvisImageLoraLoader",
                "inputs": {"dit": ["10", 0], "lora_name": "ovis_comfy_names.safetensors", "strength": 1.5}}
    wf["4"]["inputs"]["dit"] = ["11", 0]
    patched = _image(comfy, comfy.wait(comfy.queue(wf)), "6")
    wf["10"]["inputs"]["dit_name"] = "ovis_merged_in_comfyui.safetensors"
    wf["4"]["inputs"]["dit"] = ["10", 0]
    merged = _image(comfy, comfy.wait(comfy.queue(wf)), "6")
    assert abs(patched - base).max() > 10
    assert abs(patched - merged).max() <= 1


def test_torch_compile_node_runs_inside_comfyui_and_follows_lora_strength(comfy):
    """The Torch Compile node compiles the DiT with ComfyUI's cast layers and ModelPatcher LoRA patches in place:
    the compiled images match the eager ones (to a PNG level or so), and a strength change is followed."""
    eager_wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_lora_api.json"))))
    eager_wf["5"]["inputs"]["seed"] = 4242
    compiled_wf = json.loads(json.dumps(eager_wf))
    compiled_wf["50"] = {"class_type": "LetterpressErnieImageCompile",
                         "inputs": {"dit": compiled_wf["5"]["inputs"]["dit"], "mode": "default"}}
    compiled_wf["5"]["inputs"]["dit"] = ["50", 0]
    for strength in (0.0, 3.0):
        for wf in (eager_wf, compiled_wf):
            wf["8"]["inputs"]["strength"] = strength
        eager = _image(comfy, comfy.wait(comfy.queue(eager_wf)), "7")
        entry = comfy.wait(comfy.queue(compiled_wf), timeout=600)
        assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
        assert abs(_image(comfy, entry, "7") - eager).max() <= 1
    assert "First compiled pass of the ernie_image dit" in comfy.log()  # the sampler took the compiled path


def test_each_node_help_page_is_served_where_the_editor_looks_for_it(comfy):
    """The editor's NodeHelpService (comfyui-frontend-package) fetches a custom node's help from
    /extensions/<pack>/docs/<NodeName>.md, <pack> being the folder its python_module names; every node has one."""
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    info = comfy.get("/object_info")
    for name in NODE_CLASS_MAPPINGS:
        assert info[name]["python_module"] == "custom_nodes.ComfyUI-Letterpress" and info[name]["description"]
        with urllib.request.urlopen(f"{comfy.url}/extensions/ComfyUI-Letterpress/docs/{name}.md", timeout=30) as r:
            served = r.read().decode("utf-8")
        with open(os.path.join(ROOT, "web", "docs", f"{name}.md"), encoding="utf-8") as f:
            assert served == f.read(), name


def test_template_browser_lists_the_editor_workflows_only(comfy):
    listed = comfy.get("/workflow_templates")["ComfyUI-Letterpress"]
    ui = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "workflows", "*.json"))}
    assert set(listed) == ui and not any(name.endswith("_api") for name in listed)


def test_a_wrong_size_is_refused_at_queue_time(comfy):
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))))
    wf["4"]["inputs"]["width"] = 40
    with pytest.raises(AssertionError, match="positive multiple of 16"):
        comfy.queue(wf)  # ComfyUI calls the node's VALIDATE_INPUTS and refuses the prompt before running it


def test_set_latent_noise_mask_inpaints_inside_comfyui(comfy):
    """ComfyUI's own Set Latent Noise Mask on a Letterpress latent: an empty mask (redraw nothing) gives back the
    encoded picture, i.e. the same image as decoding the VAE Encode output directly; a full mask redraws it."""
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_t2i_api.json"))))
    size = wf["4"]["inputs"]["width"]
    wf["10"] = {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 0x3366CC}}
    wf["11"] = {"class_type": "LetterpressErnieImageVAEEncode", "inputs": {"vae": ["1", 2], "image": ["10", 0]}}
    wf["12"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}}
    wf["13"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["12", 0]}}
    wf["5"]["inputs"]["latent"] = ["13", 0]
    wf["14"] = {"class_type": "LetterpressErnieImageVAEDecode", "inputs": {"vae": ["1", 2], "latent": ["11", 0]}}
    wf["15"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "letterpress/encoded"}}
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    assert (_image(comfy, entry, "7") == _image(comfy, entry, "15")).all()
    wf["12"]["inputs"]["value"] = 1.0
    redrawn = comfy.wait(comfy.queue(wf))
    assert abs(_image(comfy, redrawn, "7") - _image(comfy, redrawn, "15")).max() > 2


def test_cancel_mid_training_keeps_the_steps_done_and_the_next_prompt_runs(comfy):
    """Cancel during Train LoRA (raised right after step 3's progress tick, as the Cancel button does): the prompt
    ends interrupted, the LoRA of the 3 steps done is in output/loras, and the server runs the next prompt."""
    from safetensors import safe_open

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_train_lora_api.json"))))
    wf["3"]["inputs"]["steps"] = 37  # a step count no other progress bar here has
    wf["3"]["inputs"]["seed"] = 4242
    comfy.wait(comfy.queue({"1": {"class_type": "LetterpressTestInterruptAt", "inputs": {"total": 37, "at": 3}}}))
    entry = comfy.wait(comfy.queue(wf))
    assert "execution_interrupted" in messages(entry)
    folder = os.path.join(os.path.dirname(comfy.input_dir), "output", "loras")
    kept = [f for f in os.listdir(folder) if f.startswith("ernie_image_cancelled_step3_") and f.endswith(".safetensors")]
    assert len(kept) == 1 and os.path.isfile(os.path.join(folder, kept[0].replace(".safetensors", ".training_state")))
    with safe_open(os.path.join(folder, kept[0]), "pt") as f:
        assert f.metadata()["letterpress_steps"] == "3" and any(k.endswith("lora_B.weight") for k in f.keys())
    again = comfy.wait(comfy.queue(small(wf)))
    assert again["status"]["status_str"] == "success", messages(again).get("execution_error")


def test_training_on_a_gguf_dit_inside_comfyui_saves_a_lora(comfy):
    """QLoRA inside ComfyUI: the DiT from a GGUF file (weights kept packed under ModelPatcher) trains, and Save LoRA
    writes a file the LoRA Loader reads, listed by ComfyUI's and the pack's LoRA Loaders where it is."""
    from letterpress.loaders.lora import read_lora

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_train_lora_api.json"))))
    wf["20"] = {"class_type": "LetterpressErnieImageDiTLoader",
                "inputs": {"dit_name": "ernie-image-turbo-Q4_K_M.gguf", "weight_dtype": "auto"}}
    wf["3"]["inputs"]["dit"] = ["20", 0]
    wf["6"]["inputs"]["dit"] = ["20", 0]
    wf["4"]["inputs"]["filename_prefix"] = "loras/gguf_trained"
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    folder = os.path.join(os.path.dirname(comfy.input_dir), "output", "loras")
    saved = [f for f in os.listdir(folder) if f.startswith("gguf_trained_") and f.endswith(".safetensors")]
    assert len(saved) == 1
    lora = read_lora(os.path.join(folder, saved[0]))
    assert "layers.0.self_attention.to_q" in lora.layers
    for loader in ("LoraLoaderModelOnly", "LetterpressErnieImageLoraLoader"):  # output/loras is a LoRA folder
        assert saved[0] in comfy.get(f"/object_info/{loader}")[loader]["input"]["required"]["lora_name"][0], loader
    assert any(b.abs().max() > 0 for _, b, _ in lora.layers.values())


def test_training_options_through_the_server_train_as_the_headless_runner_does(comfy, host):
    """The training settings through POST /prompt: LoRA Training Options (epochs over both buckets, accumulation,
    clipping, a cosine schedule with warmup, flip, caption dropout, a trigger word) and Checkpoints (a checkpoint
    and a sample each step, the last kept) into Train LoRA; the saved LoRA equals the headless runner's."""
    from safetensors.torch import load_file

    from letterpress.runner import Runner

    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ernie_image_train_lora_api.json"))))
    wf["14"] = {"class_type": "LetterpressLoRATrainingOptions", "inputs": {
        "target_modules": "to_q,to_out.0", "epochs": 2, "gradient_accumulation": 2, "max_grad_norm": 0.5,
        "optimizer": "AdamW", "lr_schedule": "cosine", "warmup_steps": 1, "caption_dropout": 0.3, "flip": True,
        "trigger_word": "lpstyle"}}
    wf["15"] = {"class_type": "LetterpressLoRATrainingCheckpoints", "inputs": {
        "sample_every": 1, "sample_prompt": "a sign", "sample_steps": 2, "save_every": 1, "keep_last": 1,
        "resume_from": "none", "options": ["14", 0]}}
    wf["3"]["inputs"].update(options=["15", 0], batch_size=1, learning_rate=1e-3, seed=77)
    wf["4"]["inputs"]["filename_prefix"] = "loras/options_trained"
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    out = os.path.join(os.path.dirname(comfy.input_dir), "output")
    # 2 images in 2 buckets, batch 1: 2 batches an epoch; 2 epochs of 2 accumulated batches: 2 steps
    assert sorted(os.listdir(os.path.join(out, "loras", "ernie_image_checkpoints"))) == [
        "ernie_image_step000002_00001_.safetensors", "ernie_image_step000002_00001_.training_state"]
    assert sorted(os.listdir(os.path.join(out, "letterpress", "ernie_image_samples"))) == [
        "step000001_00001_.png", "step000002_00001_.png"]
    saved = load_file(os.path.join(out, "loras", "options_trained_00001_.safetensors"))
    assert {k.split(".lora_")[0] for k in saved} == {f"transformer.layers.{i}.self_attention.{m}"
                                                    for i in (0, 1) for m in ("to_q", "to_out.0")}
    host.input_dir = comfy.input_dir
    lora = Runner().run(wf)["results"]["3"][0]
    assert lora.steps == 2 and set(lora.tensors) == set(saved)
    for key, t in lora.tensors.items():
        assert (t - saved[key]).abs().max().item() <= 1e-5, key


def test_a_folder_of_another_model_is_explained_at_queue_time(comfy, shipped_models, models_dir):
    """ovis_image_t2i with ERNIE-Image's folder picked (issue #20): ComfyUI refused it as 'Value not in list ... not in
    []'; the loader's VALIDATE_INPUTS now names what the folder holds and what to download where. A folder that is
    not there names the Hugging Face repository and the path under ComfyUI's own models/diffusers."""
    wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ovis_image_t2i_api.json"))))
    listed = comfy.get("/object_info/LetterpressOvisImageFolderLoader")["LetterpressOvisImageFolderLoader"]
    choices = listed["input"]["required"]["folder"][0]
    assert choices[0] == "Ovis-Image-7B" and "ERNIE-Image" in choices  # the family's own first, the others listed
    wf["1"]["inputs"]["folder"] = "ERNIE-Image"
    with pytest.raises(AssertionError, match=r"ERNIE-Image holds an ErnieImagePipeline \(ERNIE-Image\); the Ovis-Image "
                                             r"Folder Loader needs an OvisImagePipeline. Use an ERNIE-Image loader for "
                                             r"this folder, or download the Hugging Face repository AIDC-AI/Ovis-Image-7B"):
        comfy.queue(wf)
    wf["1"]["inputs"]["folder"] = "Not-Downloaded"
    with pytest.raises(AssertionError, match=r"'Not-Downloaded' is not a folder in .*models/diffusers.*hf download "
                                             r"AIDC-AI/Ovis-Image-7B --local-dir .*models/diffusers/Ovis-Image-7B"):
        comfy.queue(wf)


def test_a_missing_single_file_is_explained_at_queue_time(comfy, shipped_models):
    """A single file that is not in ComfyUI's models/diffusion_models: the refusal names Comfy-Org's file and the path
    under ComfyUI's own models/diffusion_models (not its legacy models/unet) to put it at, once (issue #20)."""
    with open(os.path.join(ROOT, "workflows", "api", "ernie_image_single_files_api.json")) as f:
        wf = small(json.load(f))
    wf["1"]["inputs"]["dit_name"] = "not-here/ernie-image.safetensors"
    body = json.dumps({"prompt": wf, "client_id": str(uuid.uuid4())}).encode()
    req = urllib.request.Request(comfy.url + "/prompt", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    errors = json.loads(refused.value.read())["node_errors"]["1"]["errors"]
    assert len(errors) == 1 and errors[0]["details"].startswith("dit_name - 'not-here/ernie-image.safetensors' is not a file")
    models = os.path.join(os.path.dirname(comfy.input_dir), "models")
    assert ("The ERNIE-Image DiT Loader needs an ERNIE-Image DiT file: download diffusion_models/ernie-image.safetensors "
            "from the Hugging Face repository Comfy-Org/ERNIE-Image to "
            f"{os.path.join(models, 'diffusion_models', 'ernie-image.safetensors')} ") in errors[0]["details"]
    wf["1"]["inputs"]["weight_dtype"] = "fp4"  # ComfyUI's own list check still covers the dtype
    with pytest.raises(AssertionError, match=r"Value not in list.*weight_dtype: 'fp4'"):
        comfy.queue(wf)


def test_ernie_vl_with_its_experts_in_cpu_memory_answers_as_with_them_in_the_model(comfy, host):
    """The ERNIE-VL Loader's experts option inside ComfyUI: the memory manager holds the model without its routed
    experts (a smaller size), and the answer equals the headless runner's with the experts in the model."""
    from letterpress.runner import Runner

    def workflow(experts):
        wf = small({k: v for k, v in json.load(open(os.path.join(
            ROOT, "workflows", "api", "ernie_vl_grounding_api.json"))).items() if k in ("1", "2")})
        wf["2"]["inputs"]["experts"] = experts
        wf["3"] = {"class_type": "LetterpressErnieVLGenerate",
                   "inputs": {"model": ["2", 0], "images": ["1", 0], "preset": "free question",
                              "prompt": "describe this image", "system_prompt": "", "thinking": False,
                              "max_new_tokens": 8, "temperature": 0.0, "top_p": 0.8, "seed": 0}}
        return wf

    def answer(experts):
        wf = workflow(experts)
        wf["4"] = {"class_type": "LetterpressTestText", "inputs": {"text": ["3", 0]}}
        entry = comfy.wait(comfy.queue(wf))
        assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
        text, sizes = entry["outputs"]["4"]["text"]
        return text, json.loads(sizes)["Ernie4_5_VLMoeForConditionalGeneration"]

    inside, inside_size = answer("with the model")
    offloaded, offloaded_size = answer("in CPU memory")
    host.input_dir = comfy.input_dir
    wf = workflow("with the model")
    wf["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
    headless = Runner().run(wf)["results"]["3"][0]
    assert offloaded == inside == headless
    from letterpress.loaders import ernie_vl_experts
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    folder = workflow("in CPU memory")["2"]["inputs"]["folder"]
    model = NODE_CLASS_MAPPINGS["LetterpressErnieVLLoader"]().run(folder, "auto", "in CPU memory")[0].module
    assert inside_size - offloaded_size == ernie_vl_experts.bank_bytes(model) > 0  # ComfyUI holds all but the experts


def test_ernie_vl_answers_about_comfyuis_video_as_about_its_frames_headless(comfy, host):
    """ERNIE-VL Video inside ComfyUI through POST /prompt: ComfyUI's own VIDEO (Create Video from 6 frames at 4 fps)
    and the same frames as an IMAGE batch with their frame rate give one answer, the headless runner's."""
    from letterpress.runner import Runner

    frames = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "f1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "f2": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["f1", 0]}},
              "f3": {"class_type": "ImageBatch", "inputs": {"image1": ["f2", 0], "image2": ["f2", 0]}},
              "f4": {"class_type": "ImageBatch", "inputs": {"image1": ["f3", 0], "image2": ["f2", 0]}},
              "2": {"class_type": "LetterpressErnieVLLoader",
                    "inputs": {"folder": "ERNIE-4.5-VL-28B-A3B-PT", "weight_dtype": "auto", "experts": "auto"}}}

    def ask(clip_node):
        return {"class_type": "LetterpressErnieVLGenerate",
                "inputs": {"model": ["2", 0], "video": [clip_node, 0], "preset": "free question",
                           "prompt": "describe this image", "system_prompt": "", "thinking": False,
                           "max_new_tokens": 8, "temperature": 0.0, "top_p": 0.8, "seed": 0}}

    wf = dict(frames)
    wf["v"] = {"class_type": "CreateVideo", "inputs": {"images": ["f4", 0], "fps": 4.0}}
    wf["c1"] = {"class_type": "LetterpressErnieVLVideo", "inputs": {"sample_fps": 2.0, "video_file": ["v", 0]}}
    wf["c2"] = {"class_type": "LetterpressErnieVLVideo",
                "inputs": {"sample_fps": 2.0, "frames": ["f4", 0], "frame_rate": 4.0}}
    wf["g1"], wf["g2"] = ask("c1"), ask("c2")
    wf["t1"] = {"class_type": "LetterpressTestText", "inputs": {"text": ["g1", 0]}}
    wf["t2"] = {"class_type": "LetterpressTestText", "inputs": {"text": ["g2", 0]}}
    entry = comfy.wait(comfy.queue(wf))
    assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
    from_video, from_frames = entry["outputs"]["t1"]["text"][0], entry["outputs"]["t2"]["text"][0]

    # headless: the same frames built here, the nodes called without ComfyUI (the runner has no ImageInvert,
    # ImageBatch or CreateVideo)
    import numpy as np
    import torch
    from PIL import Image

    img = torch.from_numpy(np.asarray(Image.open(os.path.join(comfy.input_dir, "example.png")).convert("RGB"),
                                      dtype=np.float32) / 255.0)[None]
    clip = torch.cat([img, 1.0 - img] * 3)
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    model = N["LetterpressErnieVLLoader"]().run("ERNIE-4.5-VL-28B-A3B-PT", "auto")[0]
    video = N["LetterpressErnieVLVideo"]().run(2.0, frames=clip, frame_rate=4.0)[0]
    generate = {k: v for k, v in ask("c2")["inputs"].items() if k not in ("model", "video")}
    headless = N["LetterpressErnieVLGenerate"]().run(model, video=video, **generate)[0]
    assert from_video == from_frames == headless and headless


# The editor of ComfyUI 0.33.0 (frontend 1.49.6): downloads offered for missing files, blueprints listed ---------

MISSING = ["ernie-image-turbo.safetensors", "ministral-3-3b.safetensors", "ernie-image-prompt-enhancer.safetensors",
           "flux2-vae.safetensors"]


def test_a_shipped_workflow_with_its_files_absent_offers_each_for_download(comfy, tmp_path):
    """Opened on a ComfyUI whose models/ is empty, the editor's Missing Models panel lists every single file of the
    workflow with its folder and a Download button, and holds the URL of loaders/explain.py's table for each."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright for the editor test")
    if _version(comfy.frontend_version) < (1, 49):
        pytest.skip(f"frontend {comfy.frontend_version} has no missing-models panel of this kind")
    from letterpress.loaders.explain import models

    (tmp_path / "custom_nodes").mkdir()
    os.symlink(ROOT, tmp_path / "custom_nodes" / "ComfyUI-Letterpress")
    root, _ = frontend_for(comfy.release)
    empty = start(comfy.release, str(tmp_path), ["--cpu", *(["--front-end-root", root] if root else [])])
    ui = json.load(open(os.path.join(ROOT, "workflows", "ernie_image_turbo_single_files.json")))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(empty.url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && 'LetterpressErnieImageDiTLoader' in "
                                   "window.LiteGraph.registered_node_types", polling=250, timeout=120000)
            page.evaluate("() => document.querySelectorAll('.p-dialog-mask, .p-toast').forEach(e => e.remove())")
            page.evaluate("([ui, name]) => window.app.loadGraphData(ui, true, true, name)", [ui, "turbo.json"])
            # the error overlay's button (the template browser a new user sees first may cover it)
            page.locator("[data-testid=error-overlay-see-errors]").dispatch_event("click", timeout=60000)
            page.wait_for_function("(names) => names.every(n => document.body.innerText.includes(n))", arg=MISSING,
                                   polling=250, timeout=60000)
            page.screenshot(path=os.path.join(tempfile.gettempdir(), "letterpress_missing_models.png"))
            assert page.get_by_text("Missing Models").count() and \
                page.evaluate("() => [...document.querySelectorAll('button')].filter(b => b.innerText.trim() === "
                              "'Download').length") == len(MISSING)
            # the candidates behind the panel: each file with the URL and folder the table gives it
            shown = page.evaluate("""() => {
                const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
                const store = [...pinia._s.values()].find(s => Array.isArray(s.missingModelCandidates));
                return store.missingModelCandidates.map(c => ({name: c.name, url: c.url, directory: c.directory}));
            }""")
            table = {s.name: s.as_model() for s in models() if s.file}
            assert sorted(shown, key=lambda m: m["name"]) == sorted((table[n] for n in MISSING), key=lambda m: m["name"])
            browser.close()
    finally:
        empty.stop()


BLUEPRINTS = json.load(open(os.path.join(ROOT, "tools", "blueprints.json")))
PINIA = "document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s"


def _inner_prompt(prompt: dict, outside: list[str]) -> dict:
    """The part of a prompt the editor queues for one inserted blueprint: its inner nodes ("N:id" in the prompt)
    by their ids in the source workflow, links between them as the API writes them, links from outside dropped."""
    inner = {}
    for key, node in prompt.items():
        if ":" not in key:
            continue
        inputs = {k: ([v[0].split(":")[-1], v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        inner[key.split(":")[-1]] = {"class_type": node["class_type"],
                                     "inputs": {k: v for k, v in inputs.items() if not (isinstance(v, list) and v[0] in outside)}}
    return inner


def test_blueprints_are_listed_inserted_and_one_draws_what_its_workflow_draws(comfy):
    """In ComfyUI 0.33.0's editor: the node library lists each of subgraphs/*.json under Subgraph Blueprints >
    Letterpress; each, clicked there on an empty graph, becomes one subgraph node whose prompt is its source
    workflow's nodes with their settings; Ovis-Image's, sized through its promoted widgets, wired to a Save Image
    and queued with the editor's Run button, saves the image the source API workflow saves through POST /prompt."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright for the editor test")
    if _version(comfy.frontend_version) < (1, 49):
        pytest.skip(f"the test drives frontend 1.49's node library; {comfy.frontend_version}'s differs (1.35.9, of "
                    "ComfyUI 0.8.0, lists the blueprints too, with no category folder)")
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "subgraphs", "*.json")))
    assert names == sorted(k for k in BLUEPRINTS if not k.startswith("_"))
    declared = _declared_inputs(comfy.get("/object_info"))

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(comfy.url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                               "'LetterpressOvisImageSampler' in window.LiteGraph.registered_node_types",
                               polling=250, timeout=120000)
        # Global blueprints load after the editor starts (fetchSubgraphs, not awaited), keyed by /global_subgraphs' id
        listed = page.wait_for_function(f"""() => {{
            const defs = {PINIA}.get('subgraph').subgraphBlueprints.filter(d => d.category === 'Subgraph Blueprints/Letterpress');
            return defs.length >= 7 && defs.map(d => d.display_name).sort();
        }}""", polling=250, timeout=120000).json_value()
        assert listed == names
        templates = page.locator("[aria-labelledby=global-workflow-template-selector]")  # what a new user sees first
        try:
            templates.wait_for(timeout=15000)
            page.keyboard.press("Escape")
            templates.wait_for(state="detached", timeout=30000)
        except sync_api.TimeoutError:
            assert not templates.count()
        page.evaluate(f"() => {PINIA}.get('command').execute('Workspace.ToggleSidebarTab.node-library')")
        search = page.get_by_placeholder("Search...")
        prompts = {}
        for name in names:
            page.evaluate("() => window.app.graph.clear()")
            search.fill(name.split(" (")[0])  # as a user types it (the library's search finds no parentheses)
            page.get_by_text(name, exact=True).first.click()  # the library's leaf picks it up (a click-drag) ...
            page.mouse.click(1000, 500)  # ... and a click on the canvas drops it there
            page.wait_for_function("() => window.app.graph._nodes.length === 1", polling=250, timeout=30000)
            prompts[name] = page.evaluate("""async () => {
                const node = window.app.graph._nodes[0];
                return {title: node.title, subgraph: !!node.subgraph, prompt: (await window.app.graphToPrompt()).output};
            }""")
        for name in names:
            spec = BLUEPRINTS[name]
            api = json.load(open(os.path.join(ROOT, "workflows", "api", spec["workflow"] + "_api.json")))
            got = prompts[name]
            assert got["title"] == name and got["subgraph"], name
            inner = _inner_prompt(got["prompt"], spec["outside"])
            want = {k: {"class_type": v["class_type"], "inputs": {i: x for i, x in declared(v).items()
                                                                 if not (isinstance(x, list) and x[0] in spec["outside"])}}
                    for k, v in api.items() if k not in spec["outside"]}
            assert {k: {**v, "inputs": declared(v)} for k, v in inner.items()} == want, name
        # The last one dropped, Ovis-Image's, end to end: sized through its promoted widgets, wired to a Save Image,
        # queued with the editor's Run button
        assert names[-1] == "Ovis-Image Text to Image"
        save_id = page.evaluate("""() => {
            const node = window.app.graph._nodes[0];
            for (const w of node.widgets) if (w.name === 'width' || w.name === 'height') w.value = 64;
            const save = window.LiteGraph.createNode('SaveImage');
            window.app.graph.add(save);
            save.pos = [node.pos[0] + node.size[0] + 60, node.pos[1]];
            save.widgets.find(w => w.name === 'filename_prefix').value = 'letterpress/blueprint_ovis';
            node.connect(0, save, 0);
            window.app.canvas.setDirty(true, true);
            return String(save.id);
        }""")
        with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as queued:
            page.get_by_test_id("queue-button").click()  # Run
        assert queued.value.ok, queued.value.text()
        entry = comfy.wait(queued.value.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", messages(entry).get("execution_error")
        page.screenshot(path=os.path.join(tempfile.gettempdir(), "letterpress_blueprint_queued.png"))
        browser.close()
    drawn = _image(comfy, entry, save_id)
    # the source workflow through POST /prompt, same seed and settings, with ComfyUI's cache emptied first so that
    # it draws again rather than reusing the blueprint's outputs (its sampler must not be among the cached nodes)
    api = small(json.load(open(os.path.join(ROOT, "workflows", "api", "ovis_image_single_files_api.json"))), steps=50)
    for _ in range(3):
        comfy.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1)
        reference = comfy.wait(comfy.queue(api))
        assert reference["status"]["status_str"] == "success", messages(reference).get("execution_error")
        if "4" not in messages(reference)["execution_cached"]["nodes"]:
            break
    else:
        raise AssertionError("ComfyUI's cache was not emptied: the API workflow was not drawn again")
    assert drawn.shape == (64, 64, 3)
    assert (drawn == _image(comfy, reference, "6")).all()
