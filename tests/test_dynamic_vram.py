"""The pack under ComfyUI's dynamic VRAM manager (0.33.0 and later), proven on CPU: see dynamic_vram_check.py for
how the manager's GPU-only parts are reproduced from its code. Each check also runs once with what it checks broken
(`--break`), to show that it fails then."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_comfyui import RELEASES, release_name, small

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DYNAMIC = [p for p in RELEASES if os.path.exists(os.path.join(p, "comfy", "memory_management.py"))
           and "aimdo_enabled" in open(os.path.join(p, "comfy", "memory_management.py")).read()]
pytestmark = pytest.mark.skipif(not DYNAMIC, reason="no ComfyUI release with dynamic VRAM (0.33.0 or later) found")
params = pytest.mark.parametrize("release", DYNAMIC, ids=[release_name(p) for p in DYNAMIC])

# Every stage of every family: ERNIE-Image (folder and single files, DiT, text encoder, VAE, prompt enhancer, a GGUF
# DiT with packed layers, a LoRA), Ovis-Image, GLM-Image (text-to-image and editing: the AR model's vision part),
# ERNIE-4.5-VL.
WORKFLOWS = ["ernie_image_enhanced_t2i", "ernie_image_single_files", "ernie_image_turbo_gguf", "ernie_image_lora",
             "ovis_image_t2i", "glm_image_t2i", "glm_image_edit", "ernie_vl_grounding"]


def _run(release: str, *args: str, broken: str | None = None) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "dynamic_vram_check.py"), release, *args]
    if broken:
        cmd += ["--break", broken]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=HERE)  # bounds a hang only
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bf16_workflows(shipped_models, tmp_path_factory):
    """The workflows, small, every loader storing bf16 (a dtype the lazily built layers were not built in)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("dynamic_vram")
    inputs = folder / "input"
    inputs.mkdir()
    paths = []
    for name in WORKFLOWS:
        wf = small(json.load(open(os.path.join(ROOT, "workflows", "api", f"{name}_api.json"))))
        for node in wf.values():
            if "weight_dtype" in node["inputs"]:
                node["inputs"]["weight_dtype"] = "bf16"
            if node["class_type"] == "LoadImage":
                Image.new("RGB", (64, 64), (200, 120, 40)).save(inputs / node["inputs"]["image"])
        path = folder / f"{name}.json"
        path.write_text(json.dumps(wf))
        paths.append(str(path))
    return str(inputs), paths


@params
def test_every_stage_builds_lazily_fills_and_draws_as_without_dynamic_vram(release, models_dir, bf16_workflows):
    """With comfy-aimdo's switch on (ComfyUI's Linear and Embedding created without weights, filled lazily) and every
    ComfyUI layer computing through its cast path, every workflow draws exactly what it draws with it off; every
    layer of a kind ComfyUI has an op for, packed ones included, computes through the cast path (the modules of
    the models' own classes that hold weights are small norms, checked at real size by test_layers.py), and each
    parameter's archived dtype (which sizes its slot) is the dtype it is stored in."""
    inputs, paths = bf16_workflows
    report = _run(release, "draw", models_dir, inputs, *paths)
    assert set(report) == {os.path.basename(p) for p in paths}
    for name, r in report.items():
        assert r["images"] >= 1 and r["lazy"] > 0, (name, r)
        assert r["diff"] == 0.0, (name, r)
        assert [u for u in r["uncast"] if u["kind"] or u["packed"]] == [], (name, r)  # no layer of a kind ComfyUI has
        assert r["dtype_mismatches"] == [], (name, r)


@params
@pytest.mark.parametrize("broken", ["cast", "archive"])
def test_the_draw_check_fails_when_what_it_checks_is_broken(release, models_dir, bf16_workflows, broken):
    inputs, paths = bf16_workflows
    gguf = [p for p in paths if "gguf" in p]
    r = _run(release, "draw", models_dir, inputs, *gguf, broken=broken)["ernie_image_turbo_gguf.json"]
    if broken == "cast":  # packed layers computing around the cast path are named
        assert {"class": "QuantizedLinear", "kind": "Linear", "packed": True} in r["uncast"], r
    else:  # bf16 weights in slots sized for the fp32 the layers were built in
        assert r["dtype_mismatches"] and "archived torch.float32, stored torch.bfloat16" in r["dtype_mismatches"][0]


@params
def test_a_lora_placed_by_the_dynamic_manager_applies_on_every_layer_kind(release):
    """ModelPatcherDynamic.load itself places each patch (ComfyUI's patches in weight_lowvram_function, the pack's
    LoRAs on packed layers in weight_function); through the vbar cast path each layer computes weight + LoRA, as the
    plain torch layer with that weight does."""
    report = _run(release, "lora")
    assert len(report) == 10
    for label, r in report.items():
        assert r["patcher"] == "ModelPatcherDynamic" and r["slot"], (label, r)
        assert r["placed"] == (["weight_function"] if "packed" in label else ["weight_lowvram_function"]), (label, r)
        tolerance = 1e-2 if "fp8" in label else 1e-5  # fp8 storage computes in bf16
        assert r["diff"] <= tolerance * r["scale"] < r["lora_effect"], (label, r)


@params
def test_the_lora_check_fails_when_packed_layers_drop_their_patches(release):
    report = _run(release, "lora", broken="patches")
    for label, r in report.items():
        if "packed" in label:
            assert r["diff"] > 0.5 * r["lora_effect"], (label, r)
        else:
            assert r["diff"] <= 1e-2 * r["scale"], (label, r)


@params
def test_a_stage_loaded_by_the_dynamic_manager_computes_on_the_load_device(release, shipped_models, models_dir):
    """Its large layers' weights stay on the offload device (the first weight is on the CPU, in a slot), yet each
    stage that generates and its transformers model (model.device, where generate() moves its inputs at every step)
    name the load device: the loaders build them as the host's model_class, a subclass reporting it."""
    report = _run(release, "device", models_dir)
    assert set(report) == {"prompt enhancer", "GLM-Image AR model", "ERNIE-4.5-VL"}
    for name, r in report.items():
        assert r["patcher"] == "ModelPatcherDynamic" and r["slots"] > 0 and r["first_weight"] == "cpu", (name, r)
        assert r["handle"] == r["model"] == "cpu:0", (name, r)
    assert report["ERNIE-4.5-VL"]["class"] == "Ernie4_5_VLMoeForConditionalGeneration"
