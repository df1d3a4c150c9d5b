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


def _mapped_rss(path: str) -> int:
    """Bytes of `path`'s memory maps resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == path
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_release_gives_back_a_tensors_own_pages_and_none_it_shares(tmp_path):
    """Checkpoint.release (after a weight was quantized into a copy): the pages wholly inside the tensor's bytes
    leave the process, a page it shares with its neighbour stays (a value written there, which lives only in this
    process's copy-on-write page, is kept), and the tensor reads the file's values again afterwards."""
    import mmap

    from letterpress.loaders.weights import Checkpoint

    if not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/smaps"):
        import pytest

        pytest.skip("needs Linux's madvise and /proc/self/smaps")
    page = mmap.PAGESIZE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64 * page // 4 + 3, generator=gen)  # neither end on a page boundary
    b = torch.randn(page // 4, generator=gen)
    path = str(tmp_path / "two.safetensors")
    save_file({"a": a, "b": b}, path)
    ck = Checkpoint([path])
    ta, tb = ck["a"], ck["b"]
    assert torch.equal(ta, a) and torch.equal(tb, b)  # every page of both read in
    tb[0] = 42.0  # b's first page (shared with a's last bytes) becomes this process's own copy
    before = _mapped_rss(path)
    ck.release("a")
    dropped = before - _mapped_rss(path)
    assert dropped >= 63 * page, f"release gave back {dropped} bytes of a's {a.numel() * 4}"
    assert tb[0].item() == 42.0 and torch.equal(tb[1:], b[1:])  # the shared page was not dropped
    assert torch.equal(ta, a)  # a's pages read again from the file
    del ta, tb
    ck.close()
