"""fp32 Linear products on CPU through oneDNN (the standalone host's CPU path): same numbers as torch's default
up to float rounding, eager and compiled, in a whole staged graph against diffusers; falls back where it does
not apply; follows weights changed in place (LoRA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from letterpress.loaders import cpu_linear, layers
from letterpress.loaders.layers import OneDnnLinear
from letterpress.loaders.storage import Storage
from letterpress.loaders.weights import fill_module
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.skipif(cpu_linear._COMPILED_OP is None, reason="this torch has no oneDNN")


@pytest.fixture
def calls(monkeypatch):
    """How many products went through oneDNN (eager or inside compiled code: both end in `_onednn`)."""
    seen = []
    real = cpu_linear._onednn

    def spy(x, weight, bias):
        seen.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "_onednn", spy)
    return seen


def use_onednn(layer: torch.nn.Linear) -> torch.nn.Module:
    """`layer` rebuilt as the standalone host builds fp32 Linear layers on CPU, holding the same tensors."""
    return layers.build_layers(torch.nn.Sequential(layer), layers.standalone_ops(torch.float32, torch.device("cpu")))[0]


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def test_matches_f_linear_and_follows_in_place_weight_changes(calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 384)
    keys = set(layer.state_dict())
    layer = use_onednn(layer)
    assert type(layer) is OneDnnLinear and set(layer.state_dict()) == keys
    x = torch.randn(2, 40, 256)
    with torch.no_grad():
        assert close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert calls == [(2, 40, 256)]
        layer.weight.add_(torch.randn_like(layer.weight))  # what a LoRA patch does
        assert close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.bias = None
        flat = x.reshape(80, 256)
        assert close(layer(flat.t().contiguous().t()), F.linear(flat, layer.weight))  # strided input, no bias
    assert len(calls) == 3


def test_falls_back_where_onednn_does_not_apply(calls, monkeypatch):
    torch.manual_seed(0)
    layer = use_onednn(torch.nn.Linear(256, 384))
    x = torch.randn(64, 256)
    with torch.no_grad():
        layer.to(torch.bfloat16)(x.bfloat16())  # bf16 goes to oneDNN through torch already
        layer.float()
        monkeypatch.setattr(cpu_linear, "MIN_MACS", 64 * 256 * 384 + 1)
        layer(x)  # too small a product to pay oneDNN's per-call overhead
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    x.requires_grad_(True)
    layer(x).sum().backward()  # autograd: F.linear, which has a backward
    assert x.grad is not None and not calls
    with torch.no_grad():
        layer(x)
    assert calls


def test_odd_biases_training_and_autocast_stay_on_f_linear(calls, monkeypatch):
    """Cases oneDNN would get wrong or cannot do: a bias that is not one dense row (oneDNN reads it as one), a
    trainable bias (the op has no backward), autocast (the product must come out in the autocast dtype)."""
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    torch.manual_seed(0)
    layer = use_onednn(torch.nn.Linear(64, 48))
    x = torch.randn(5, 64)
    with torch.no_grad():
        strided = torch.randn(48, 2)[:, 0]
        layer.bias = torch.nn.Parameter(strided, requires_grad=False)
        assert close(layer(x), F.linear(x, layer.weight, strided))
        layer.bias = torch.nn.Parameter(torch.randn(1).expand(48), requires_grad=False)
        assert torch.isfinite(layer(x)).all() and close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not calls
    layer.weight.requires_grad_(False)
    layer.bias = torch.nn.Parameter(torch.randn(48))  # only the bias trains (e.g. a LoRA with trainable biases)
    layer(x).sum().backward()
    assert layer.bias.grad is not None and not calls
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    torch.backends.mkldnn.enabled = False
    try:
        with torch.no_grad():
            layer(x)
    finally:
        torch.backends.mkldnn.enabled = True
    assert not calls
    with torch.no_grad():
        layer(x)
    assert calls  # and the plain case does go to oneDNN


def test_compiled_layer_calls_the_onednn_op_in_one_graph_and_follows_weight_changes(calls, monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    torch.manual_seed(0)
    layer = use_onednn(torch.nn.Linear(64, 48))
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(layer, backend=capture, fullgraph=True)(x)  # fullgraph: no graph break around the op
        assert any("letterpress.onednn_linear" in g for g in graphs)
        compiled = torch.compile(layer)
        assert close(compiled(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.add_(1.0)  # a LoRA patched in place after compiling
        assert close(compiled(x), F.linear(x, layer.weight, layer.bias))
    assert calls


def test_the_table_picks_onednn_for_fp32_on_cpu_only_and_it_can_be_turned_off(monkeypatch):
    cpu, fp8 = torch.device("cpu"), layers.FP8
    assert layers.standalone_ops(fp8, cpu).classes["Linear"] is layers.Linear  # fp8 storage casts per layer
    # and a load with an fp8 Storage through that table stores the Linear weight in fp8 (its bias in bf16), which
    # the layer casts to the input's bf16 at each call
    torch.manual_seed(0)
    state = {"0.weight": torch.randn(4, 8), "0.bias": torch.randn(4)}
    with torch.device("meta"):
        empty = torch.nn.Sequential(torch.nn.Linear(8, 4))
    model = layers.build_layers(empty, layers.standalone_ops(fp8, cpu))
    fill_module(model, state, storage=Storage(fp8, choice="fp8_e4m3fn"))
    assert type(model[0]) is layers.Linear
    assert model[0].weight.dtype is fp8 and model[0].bias.dtype is torch.bfloat16
    assert torch.equal(model[0].weight.float(), state["0.weight"].to(fp8).float())
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), F.linear(x, state["0.weight"].to(fp8).bfloat16(), state["0.bias"].bfloat16()))
    assert layers.standalone_ops(torch.bfloat16, cpu).classes["Linear"] is layers.Linear
    assert layers.standalone_ops(torch.float32, torch.device("cuda")).classes["Linear"] is layers.Linear
    for off in ("0", "off", "False"):
        monkeypatch.setenv("LETTERPRESS_ONEDNN_LINEAR", off)
        assert type(use_onednn(torch.nn.Linear(8, 8))) is layers.Linear


PROMPT = "a poster with the words hello world in bold red letters"


def test_staged_graph_with_onednn_products_matches_diffusers(ernie, models_dir, calls, monkeypatch):
    """Every Linear of the text encoder, DiT and VAE through oneDNN (no size threshold): the staged ERNIE-Image
    graph still draws diffusers' image, eager and with Torch Compile."""
    import os

    from diffusers import ErnieImagePipeline

    monkeypatch.setattr(cpu_linear, "MIN_MACS", 0)
    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.set_progress_bar_config(disable=True)
    assert not any(type(m) is OneDnnLinear for m in pipe.transformer.modules())  # the reference stays on torch's
    ref = torch.from_numpy(pipe(PROMPT, height=48, width=32, num_inference_steps=3, guidance_scale=4.0,
                                generator=torch.Generator("cpu").manual_seed(5), output_type="np",
                                use_pe=False).images)

    dit, te, vae, _pe = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    assert any(type(m) is OneDnnLinear for m in dit.module.modules())
    assert any(type(m) is OneDnnLinear for m in te.module.modules())
    pos = N["LetterpressErnieImageTextEncode"]().run(te, PROMPT)[0]
    neg = N["LetterpressErnieImageTextEncode"]().run(te, "")[0]
    lat = N["LetterpressErnieImageEmptyLatent"]().run(32, 48, 1)[0]

    def draw(model):
        before = len(calls)
        out = N["LetterpressErnieImageSampler"]().run(model, pos, lat, 5, 3, 4.0, 4.0, 1.0, neg)[0]
        assert len(calls) > before  # the DiT's products went through oneDNN (counted before the VAE runs)
        return N["LetterpressErnieImageVAEDecode"]().run(vae, out)[0]

    eager = draw(dit)
    assert (eager - ref).abs().max().item() <= 1e-4
    compiled = draw(N["LetterpressErnieImageCompile"]().run(dit, "default")[0])
    assert (compiled - ref).abs().max().item() <= 1e-4
