"""benchmarks/gpu_check.py cannot run its real-size check here (no GPU); its --tiny mode runs the same code on the
tiny models on CPU. With the pack computing in fp32 as the reference does, each family's image must equal the
pipeline's: the harness (workflow settings, seeds, prompts, step clock) measures the same work on both sides."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_tiny_mode_draws_the_reference_image_on_both_sides(tmp_path, session_host, monkeypatch):
    from letterpress.loaders.host import set_host

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up
    spec.loader.exec_module(gpu_check)
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
