"""The GPU checks cannot run their real-size runs here (no GPU); their --tiny modes run the same code on the tiny
models on CPU: benchmarks/gpu_check.py through the headless runner, benchmarks/gpu_check_comfyui.py inside ComfyUI
0.33.0 through POST /prompt. With the pack computing in fp32 as the reference does, each family's image must equal the
pipeline's: the harness (workflow settings, seeds, prompts, step clock) measures the same work on both sides."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_tiny_mode_draws_the_reference_image_on_both_sides(tmp_path, session_host, monkeypatch):
    from letterpress.loaders.host import set_host

    gpu_check = _load("gpu_check")
    monkeypatch.setenv("LETTERPRESS_DEVICE", "cpu")  # the script sets it; restored after the test
    try:
        rows = gpu_check.main(["--tiny", "--storage", "bf16,Q8_0", "--work", str(tmp_path)])
    finally:
        set_host(session_host)
    by_run = {(label, run): rest for label, run, *rest in rows}
    for label in ("ERNIE-Image", "Ovis-Image", "GLM-Image"):
        step, _peak, wall, diff = by_run[(label, "pack bf16")]
        assert diff <= 1e-4, (label, diff)
        assert step > 0 and wall > 0 and math.isfinite(step)
        assert by_run[(label, "diffusers cpu_offload (bf16)")][0] > 0
    assert isinstance(by_run[("ERNIE-Image", "pack Q8_0")][3], float)  # the GGUF DiT ran
    assert by_run[("GLM-Image", "pack Q8_0")][3].startswith("skipped")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


COMFYUI_0_33 = os.path.join(ROOT, "..", "shared", "comfyui", "0.33.0")


@pytest.mark.skipif(not os.path.exists(os.path.join(COMFYUI_0_33, "main.py")), reason="no ComfyUI 0.33.0 tree")
def test_gpu_check_in_comfyui_tiny_mode_draws_the_reference_image_through_post_prompt(tmp_path):
    """benchmarks/gpu_check_comfyui.py --tiny: each family's shipped workflow through POST /prompt in ComfyUI 0.33.0
    (--cpu: dynamic VRAM is never on there, and ComfyUI's log shows its classic ModelPatcher loads) draws the image diffusers'
    pipeline draws from the same files, to the PNG's rounding (fp32 on both sides), under each server configuration
    (on CPU the flags change nothing: the harness is what runs); ERNIE-Image-Turbo also from its Q4_K GGUF DiT and
    with every stage quantized to Q4_0 at load. Each run has its seconds per step, wall time and peak
    figures (CUDA's are NaN on CPU; the server's resident memory is there)."""
    check = _load("gpu_check_comfyui")
    rows = check.main(["--tiny", "--comfyui", COMFYUI_0_33, "--work", str(tmp_path)])
    assert not [r for r in rows if "error" in r or "skipped" in r]
    by_run = {(r["family"], r["config"], r["run"]): r for r in rows}
    configs = ("dynamic", "static", "stream")
    expected = [(label, config, "bf16") for label in ("ERNIE-Image-Turbo", "Ovis-Image", "GLM-Image") for config in configs]
    expected += [("ERNIE-Image-Turbo", config, "Q4_K") for config in configs]
    expected += [("ERNIE-Image-Turbo", "dynamic", "Q4_0 at load")]
    for key in expected:
        r = by_run[key]
        assert r["step"] > 0 and math.isfinite(r["step"]) and r["wall"] > 0 and r["rss"] > 0, key
        assert math.isnan(r["peak"]) and math.isnan(r["device_peak"]), key  # no CUDA here
        assert r["aimdo"] is False and r["loads"] in (["classic"], []), key  # [] when every model stayed loaded
        if key[2] == "bf16":
            assert r["diff"] <= 1 / 255 + 1e-3, (key, r["diff"])
        elif key[2] == "Q4_K":
            assert r["diff"] == "random Q4_K weights"
        else:  # every stage quantized at load: compared with the bf16 reference (4-bit noise, large on the tiny
            # random models; that the quantized stages draw their reference is tests/test_quantize_at_load.py's)
            assert 0 < r["diff"] <= 1, (key, r["diff"])
    assert by_run[("Ovis-Image", "in process", "diffusers")]["step"] > 0


def test_gpu_check_in_comfyui_skips_what_does_not_fit_the_budget(tmp_path):
    check = _load("gpu_check_comfyui")
    rows = check.main(["--tiny", "--comfyui", str(tmp_path), "--work", str(tmp_path), "--budget-s", "0"])
    assert [r["family"] for r in rows] == ["ERNIE-Image-Turbo", "Ovis-Image", "GLM-Image"]
    assert all(r["skipped"].startswith("did not fit the budget") for r in rows)
    assert not os.listdir(tmp_path)  # nothing built
