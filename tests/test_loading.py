"""Loading is memory-efficient: no random initialisation, no copy of the file's weights."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from letterpress.nodes import NODE_CLASS_MAPPINGS as N


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status")


def test_dit_load_allocates_nothing_like_the_file(tmp_path, host, monkeypatch):
    from diffusers import ErnieImageTransformer2DModel

    with torch.device("meta"):
        model = ErnieImageTransformer2DModel(hidden_size=512, num_attention_heads=8, num_layers=8,
                                             ffn_hidden_size=1536, text_in_dim=256, rope_axes_dim=(16, 24, 24))
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    path = folder / "big-ernie.safetensors"
    save_file({k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}, str(path))
    size = os.path.getsize(path)
    host.models_dir = str(tmp_path)

    inits = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: inits.append(t) or t)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t) or t)
    before = rss()
    dit = N["LetterpressErnieImageDiTLoader"]().run("big-ernie.safetensors", "fp32")[0]
    grown = rss() - before
    assert not [t for t in inits if not t.is_meta]  # nothing random was drawn for real
    assert grown < 0.2 * size, f"loading grew RSS by {grown / size:.2f} x the file"
    # The weights are the file's: reading them gives the saved values.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        key = "layers.3.mlp.gate_proj.weight"
        assert torch.equal(dit.module.get_submodule("layers.3.mlp.gate_proj").weight, f.get_tensor(key))
