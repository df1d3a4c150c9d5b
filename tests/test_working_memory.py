"""The activation estimates the samplers and VAE nodes pass the host (ComfyUI's memory_required), against the
activations measured on the real architectures (benchmarks/real_size_accounting.py: one bf16 forward on fake
tensors) at sizes other than the 1024x1024 the factors were taken from."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from letterpress.loaders.handle import ModelHandle
from letterpress.samplers import working_memory

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from real_size_accounting import fake_forward_peak, models  # noqa: E402


def bf16_handle(family: str) -> ModelHandle:
    return ModelHandle(family, "dit", torch.nn.Linear(1, 1, dtype=torch.bfloat16))


@pytest.mark.parametrize("size", [512, 768])
def test_estimates_cover_the_measured_activations(size):
    stages = {(model, stage.split(" ")[0]): (factory, forward) for model, (_, rows) in models(size).items()
              for stage, factory, forward in rows}
    image_tokens = (size // 16) ** 2
    # (model, stage, estimate): the benchmark's inputs (ERNIE-Image: CFG batch of 2 and 512 text tokens;
    # Ovis-Image: 284 text tokens; GLM-Image: 64 glyph tokens).
    cases = [
        ("ERNIE-Image", "DiT", working_memory.dit(bf16_handle("ernie_image"), 2, image_tokens + 512, 4096)),
        ("Ovis-Image", "DiT", working_memory.dit(bf16_handle("ovis_image"), 1, image_tokens + 284, 3072)),
        ("GLM-Image", "DiT", working_memory.dit(bf16_handle("glm_image"), 1, image_tokens + 64, 4096)),
        ("ERNIE-Image", "VAE", working_memory.vae(bf16_handle("ernie_image"), 1, size, size)),
        ("Ovis-Image", "VAE", working_memory.vae(bf16_handle("ovis_image"), 1, size, size)),
    ]
    for model, stage, estimate in cases:
        _, _, measured = fake_forward_peak(*stages[(model, stage)])
        assert measured <= estimate <= 1.6 * measured, (model, stage, measured, estimate)


def test_sampler_and_vae_nodes_ask_the_host_for_their_working_memory(ernie, models_dir, monkeypatch):
    """DiT Sample and VAE Decode pass their estimate to host.load (ComfyUI's load_models_gpu memory_required): it
    grows with the image and doubles with the CFG batch."""
    from letterpress.loaders.host import get_host
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    host = get_host()
    asked = []
    original = host.load
    monkeypatch.setattr(host, "load", lambda *hs, memory_required=0: asked.append((hs[0].role, memory_required))
                        or original(*hs, memory_required=memory_required))
    node = lambda name: N["LetterpressErnieImage" + name]()  # noqa: E731
    dit, te, vae, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    pos, neg = node("TextEncode").run(te, "a red sign")[0], node("TextEncode").run(te, "")[0]

    def run(size, cfg):
        asked.clear()
        lat = node("Sampler").run(dit, pos, node("EmptyLatent").run(size, size, 1)[0], 0, 1, cfg, 4.0, 1.0, neg)[0]
        node("VAEDecode").run(vae, lat)
        return dict(asked)

    small, big, big_cfg = run(32, 1.0), run(64, 1.0), run(64, 4.0)
    assert all(v > 0 for v in small.values()) and set(small) == {"dit", "vae"}
    assert big["dit"] > small["dit"] and big["vae"] == 4 * small["vae"]
    assert big_cfg["dit"] == 2 * big["dit"] and big_cfg["vae"] == big["vae"]
