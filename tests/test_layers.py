"""The layer classes of every stage (real-size architectures on the meta device): each layer of a kind the host has
a class for is that class, built by its constructor (so it has every attribute the constructor sets), in the
standalone host and inside each ComfyUI release; and weights reach the layers through their own loading path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from layer_check import check
from test_comfyui import RELEASES, release_name

from letterpress.loaders import layers

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("bfloat16", "float8_e4m3fn")


@pytest.mark.parametrize("dtype", ["float32", *DTYPES])
def test_standalone_stages_use_the_standalone_linear_layers(dtype):
    report = check(getattr(torch, dtype))
    assert report["kinds"] == ["Linear"]
    assert len(report["stages"]) == 12  # 3 + 3 + 4 stages of the image models, the enhancer, ERNIE-VL
    assert report["stages"] == {stage: [] for stage in report["stages"]}


@pytest.mark.parametrize("release", RELEASES, ids=[release_name(p) for p in RELEASES])
def test_every_stage_is_built_from_comfyui_op_classes(release):
    out = subprocess.run([sys.executable, os.path.join(HERE, "layer_check.py"), release, *DTYPES],
                         capture_output=True, text=True, timeout=900, cwd=HERE)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = json.loads(out.stdout.strip().splitlines()[-1])
    assert reports["bfloat16"]["ops"] == "comfy.ops.disable_weight_init"
    assert reports["float8_e4m3fn"]["ops"] == "comfy.ops.manual_cast"  # fp8 storage casts per layer, as ComfyUI's
    for report in reports.values():
        # every kind ComfyUI has an op for, RMSNorm included (the DiTs hold torch RMSNorm layers)
        assert {"Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding", "RMSNorm"} <= set(report["kinds"])
        assert report["stages"] == {stage: [] for stage in report["stages"]}
        # Every other module holding weights is small enough that the dynamic VRAM manager treats it as it treats
        # ComfyUI's own small layers (loads it whole), but ERNIE-4.5-VL's expert banks and routers (#32: experts
        # off the GPU), which it loads whole too.
        large = {(stage, cls): n for stage, classes in report["plain_weights"].items()
                 for cls, n in classes.items() if n > 16 * 1024}
        assert set(large) == {("ERNIE-4.5-VL (28B-A3B)", "Ernie4_5_VLMoeMoeExperts"),
                              ("ERNIE-4.5-VL (28B-A3B)", "Ernie4_5_VLMoeMoeTopKRouter")}, large
        # Every Linear, packed at 4.5 bits, gets a slot of its own (more than 16 KB), so ComfyUI applies the
        # weight wrappers that carry LoRAs on packed layers.
        assert report["small_linears"] == {stage: [] for stage in report["stages"]}, report["small_linears"]


def test_the_check_sees_a_class_swapped_layer():
    """What the 0.8.0 failure was: a layer whose class was swapped after building lacks what the constructor of
    its new class sets (ComfyUI's Embedding sets `bias = None`)."""
    from layer_check import problems

    class Op(torch.nn.Embedding):
        def reset_parameters(self):
            self.bias = None

    ops = layers.LayerOps("test", {"Embedding": Op})
    swapped = torch.nn.Sequential(torch.nn.Embedding(4, 2))
    swapped[0].__class__ = Op
    assert "lacks ['bias']" in problems(swapped, ops)[0]
    assert problems(torch.nn.Sequential(torch.nn.Embedding(4, 2)), ops)[0].endswith("not " + Op.__qualname__)
    assert problems(layers.build_layers(torch.nn.Sequential(torch.nn.Embedding(4, 2)), ops), ops) == []


def test_weights_go_through_each_layers_own_loading_path():
    """A layer class that decides how it stores a weight (as ComfyUI's quantized layers do in _load_from_state_dict)
    gets every tensor of a file through that method, in the dtype the table asks for."""
    from safetensors.torch import save_file

    from letterpress.loaders.stage import choose_layers
    from letterpress.loaders.storage import Storage
    from letterpress.loaders.weights import fill_module, open_checkpoint

    seen = []

    class Recording(torch.nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args):
            seen.append(sorted(k[len(prefix):] for k in state_dict if k.startswith(prefix)))
            super()._load_from_state_dict(state_dict, prefix, *args)

    class Host:
        def layer_ops(self, dtype):
            return layers.LayerOps("recording", {"Linear": Recording})

    import tempfile

    from letterpress.loaders import host as host_module

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    state = {k: v.detach().clone() + 1 for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        save_file(state, os.path.join(d, "m.safetensors"))
        previous = host_module.get_host()
        host_module.set_host(Host())
        try:
            with torch.device("meta"):
                empty = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
            fp8 = Storage(layers.FP8, choice="fp8_e4m3fn")
            fill_module(choose_layers(empty, fp8), open_checkpoint(os.path.join(d, "m.safetensors")), storage=fp8)
        finally:
            host_module.set_host(previous)
    assert type(empty[0]) is Recording and seen == [["bias", "weight"]]
    assert empty[0].weight.dtype == layers.FP8 and empty[0].bias.dtype == torch.bfloat16
    assert torch.equal(empty[0].weight.float(), state["0.weight"].to(layers.FP8).float())
    assert torch.equal(empty[1].weight.float(), state["1.weight"].bfloat16().float())


@pytest.mark.skipif(not RELEASES, reason="no ComfyUI tree")
def test_a_comfyui_without_what_the_pack_needs_is_named_at_import():
    """A ComfyUI older than the oldest tested (here: a load_models_gpu that takes no memory_required) stops the
    pack's import with a message that says what is missing and to update, instead of failing mid-run."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import comfy.cli_args; comfy.cli_args.args.cpu = True; "
              "import comfy.model_management as mm; mm.load_models_gpu = lambda models: None; "
              "import letterpress.loaders.host")
    out = subprocess.run([sys.executable, "-c", script, RELEASES[0]], capture_output=True, text=True, timeout=900)  # bounds a hang only
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ComfyUI-Letterpress needs ComfyUI 0.3.64 or newer")
    assert "load_models_gpu(memory_required=...)" in last and "Update ComfyUI" in last
