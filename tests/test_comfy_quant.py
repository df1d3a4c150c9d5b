"""ComfyUI's quantized .safetensors files (`loaders/comfy_quant.py`), checked against ComfyUI's own code.

The files are written in subprocesses by the ComfyUI releases beside the project (../shared/comfyui/*):
  * ComfyUI 0.3.64 writes a legacy "scaled fp8" file with its own `scaled_fp8_ops` Linear (`set_weight`: its fp8
    quantizer) and the `scaled_fp8` marker its model saving adds, and dequantizes it with its `convert_weight`;
  * ComfyUI 0.8.0 quantizes weights with its layout classes (`QuantizedTensor.from_float`: float8_e4m3fn,
    float8_e5m2, nvfp4 through comfy_kitchen), writes them with its mixed-precision Linear's `state_dict()` (the
    `comfy_quant` JSON tensors) or with the `_quantization_metadata` header QUANTIZATION.md describes, then loads
    every file (0.3.64's too) the way ComfyUI does (`load_torch_file` -> `convert_old_quants` -> the
    mixed-precision Linear's `_load_from_state_dict`) and keeps `weight.dequantize()` as the reference;
  * formats 0.8.0 lacks (upstream's mxfp8, int8_tensorwise) are written with comfy_kitchen's layouts the way
    upstream's `_quantized_weight_state_dict` saves them and compared with comfy_kitchen's `dequantize()`.
`dequantize_layer` must equal every reference bit for bit (torch.equal), in bfloat16 and float32.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from letterpress.loaders import comfy_quant as cq
from letterpress.loaders.checkpoint import Tensors
from letterpress.loaders.errors import LetterpressError
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASES = {os.path.basename(p): p for p in sorted(glob.glob(os.path.join(ROOT, "..", "shared", "comfyui", "*")))}
DTYPES = (torch.bfloat16, torch.float32)

# ComfyUI 0.3.64: a legacy scaled-fp8 diffusion model file, made and dequantized by its own scaled_fp8_ops Linear.
MAKE_0364 = r"""
import os, sys
release, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, release)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from safetensors.torch import save_file

torch.manual_seed(0)
ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=True, override_dtype=torch.float8_e4m3fn)
sd, refs = {}, {}
for name, (rows, cols, input_scale) in {"blocks.0.qkv": (48, 64, 0.5), "blocks.1.fc": (32, 48, 1.0)}.items():
    source = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.05
    lin = ops.Linear(cols, rows, bias=True)
    lin.scale_weight.data.fill_(source.abs().max().float().item() / 448)  # per-tensor absmax scale
    lin.scale_input.data.fill_(input_scale)
    lin.set_weight(source, seed=7)  # ComfyUI's own fp8 quantizer (stochastic rounding of weight / scale_weight)
    lin.bias = torch.nn.Parameter(torch.randn(rows, dtype=torch.bfloat16), requires_grad=False)
    sd.update(lin.state_dict(prefix=name + "."))
    refs[name + "|source"] = source
    for dt in (torch.bfloat16, torch.float32):
        refs[f"{name}|{dt}"] = lin.convert_weight(lin.weight.to(dt)).contiguous()
sd["final.weight"] = torch.randn(8, 8, dtype=torch.bfloat16)
sd["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)  # the marker ComfyUI's model saving adds
save_file({k: v.detach().contiguous() for k, v in sd.items()}, os.path.join(out, "legacy.safetensors"))
save_file(refs, os.path.join(out, "refs_0364.safetensors"))
sys.stdout.flush()
os._exit(0)  # skip torch's slow interpreter teardown
"""

# ComfyUI 0.8.0: mixed-precision files quantized and written by its own code, and its own dequantization of them.
MAKE_080 = r"""
import json, os, sys, time
release, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, release)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops, comfy.utils
from comfy.quant_ops import QuantizedTensor
import comfy_kitchen.tensor as ckt
from safetensors.torch import save_file

DTYPES = (torch.bfloat16, torch.float32)
P = torch.nn.Parameter
torch.manual_seed(1)
refs, info = {}, {"configs": {}}


def linear(source, fmt=None, layout=None, bias=None):
    # A layer as ComfyUI 0.8.0's mixed-precision Linear holds it, its weight quantized by ComfyUI's layout class.
    ops = comfy.ops.mixed_precision_ops({}, source.dtype)
    lin = ops.Linear(source.shape[1], source.shape[0], bias=bias is not None)
    if layout is None:
        lin.weight = P(source, requires_grad=False)
    else:
        lin.weight = P(QuantizedTensor.from_float(source, layout, scale="recalculate"), requires_grad=False)
        lin.quant_format = fmt
    if bias is not None:
        lin.bias = P(bias, requires_grad=False)
    return lin


def saved(lin, prefix):
    # ComfyUI 0.8.0's own state_dict(); the QuantizedTensor it returns as the weight is stored as its data.
    return {k: (v._qdata if isinstance(v, QuantizedTensor) else v).detach().contiguous()
            for k, v in lin.state_dict(prefix=prefix).items()}


def comfy_load(path, prefix, layers):
    # Load the file as ComfyUI does and keep each layer's weight as ComfyUI dequantizes it.
    for dt in DTYPES:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        sd, metadata = comfy.utils.convert_old_quants(sd, prefix, metadata=metadata)
        for k, v in sd.items():
            if k.endswith(".comfy_quant"):
                info["configs"].setdefault(os.path.basename(path), {})[k[len(prefix):-len(".comfy_quant")]] = \
                    json.loads(v.numpy().tobytes())
        ops = comfy.ops.mixed_precision_ops({}, dt)
        for layer, (rows, cols) in layers.items():
            head = prefix + layer + "."
            part = {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}
            lin = ops.Linear(cols, rows, bias="bias" in part)
            lin.load_state_dict(part, strict=False)
            w = lin.weight
            w = w.dequantize() if isinstance(w, QuantizedTensor) else w.detach()
            refs[f"{os.path.basename(path)}|{layer}|{dt}"] = w.contiguous()


# 1. tensors-only mixed file: fp8 e4m3fn, fp8 e5m2, nvfp4 (padded 40x72 -> 48x80) and a full-precision layer.
shapes = {"blocks.0.qkv": (48, 64), "blocks.0.out": (32, 48), "blocks.1.mlp": (40, 72), "blocks.1.proj": (24, 32)}
src = {k: torch.randn(*s, dtype=torch.bfloat16) * 0.05 for k, s in shapes.items()}
sd = {}
qkv_bias = torch.randn(48, dtype=torch.bfloat16)
sd.update(saved(linear(src["blocks.0.qkv"], "float8_e4m3fn", "TensorCoreFP8E4M3Layout", qkv_bias), "blocks.0.qkv."))
sd.update(saved(linear(src["blocks.0.out"], "float8_e5m2", "TensorCoreFP8E5M2Layout"), "blocks.0.out."))
sd.update(saved(linear(src["blocks.1.mlp"], "nvfp4", "TensorCoreNVFP4Layout"), "blocks.1.mlp."))
sd.update(saved(linear(src["blocks.1.proj"], bias=torch.randn(24, dtype=torch.bfloat16)), "blocks.1.proj."))
save_file(sd, os.path.join(out, "mixed.safetensors"))
comfy_load(os.path.join(out, "mixed.safetensors"), "", shapes)
for k, v in src.items():
    refs[f"mixed.safetensors|{k}|source"] = v

# 2. the header convention (QUANTIZATION.md): `_quantization_metadata`, no comfy_quant tensors, a model prefix.
pre = "model.diffusion_model."
lin = saved(linear(src["blocks.0.qkv"], "float8_e4m3fn", "TensorCoreFP8E4M3Layout"), pre + "blocks.0.qkv.")
lin = {k: v for k, v in lin.items() if not k.endswith("comfy_quant")}
lin[pre + "norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
header = {"format_version": "1.0", "layers": {pre + "blocks.0.qkv": {"format": "float8_e4m3fn"}}}
save_file(lin, os.path.join(out, "header.safetensors"), metadata={"_quantization_metadata": json.dumps(header)})
comfy_load(os.path.join(out, "header.safetensors"), pre, {"blocks.0.qkv": (48, 64)})

# 3. text-encoder scaled fp8 (a nested marker of 2 elements: full precision matrix mult), by the documented layout.
w = torch.randn(16, 32, dtype=torch.bfloat16)
scale = (w.abs().max().float() / 448).reshape(())
te = {"text_encoders.t5xxl.transformer.scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
      "text_encoders.t5xxl.transformer.enc.0.q.weight": (w.float() / scale).to(torch.float8_e4m3fn),
      "text_encoders.t5xxl.transformer.enc.0.q.scale_weight": scale,
      "text_encoders.t5xxl.transformer.enc.0.q.scale_input": torch.tensor(1.0)}
save_file(te, os.path.join(out, "legacy_te.safetensors"))
comfy_load(os.path.join(out, "legacy_te.safetensors"), "text_encoders.t5xxl.transformer.", {"enc.0.q": (16, 32)})

# 4. a format ComfyUI does not define: ComfyUI's own reaction is recorded.
bad = {"blocks.2.odd.weight": torch.zeros(8, 4, dtype=torch.uint8),
       "blocks.2.odd.comfy_quant": torch.tensor(list(b'{"format": "float4_magic"}'), dtype=torch.uint8)}
save_file(bad, os.path.join(out, "unknown.safetensors"))
try:
    comfy_load(os.path.join(out, "unknown.safetensors"), "", {"blocks.2.odd": (8, 8)})
    info["unknown"] = "loaded"
except Exception as e:
    info["unknown"] = f"{type(e).__name__}: {e}"

# 5. upstream-only formats, by comfy_kitchen's layouts, saved as upstream's state_dict does (weight + weight_scale).
for name in ("TensorCoreMXFP8Layout", "TensorWiseINT8Layout"):
    try:
        ckt.get_layout_class(name)
    except KeyError:
        ckt.register_layout_class(name, getattr(ckt, name))
up = {}
cases = {"mx": ("mxfp8", "TensorCoreMXFP8Layout", torch.randn(40, 72, dtype=torch.bfloat16), {}),
         "i8": ("int8_tensorwise", "TensorWiseINT8Layout", torch.randn(24, 40), {}),
         "i8row": ("int8_tensorwise", "TensorWiseINT8Layout", torch.randn(24, 40, dtype=torch.bfloat16),
                   {"per_channel": True})}
for layer, (fmt, layout, source, kw) in cases.items():
    qt = ckt.QuantizedTensor.from_float(source, layout, **kw)
    up.update({k: v.contiguous() for k, v in qt.state_dict(layer + ".weight").items()})
    up[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    refs[f"upstream.safetensors|{layer}|{source.dtype}"] = qt.dequantize().contiguous()
    refs[f"upstream.safetensors|{layer}|source"] = source
save_file(up, os.path.join(out, "upstream.safetensors"))

# 6. the legacy file ComfyUI 0.3.64 wrote (it runs first), loaded by 0.8.0.
comfy_load(os.path.join(out, "legacy.safetensors"), "", {"blocks.0.qkv": (48, 64), "blocks.1.fc": (32, 48),
                                                         "final": (8, 8)})
save_file(refs, os.path.join(out, "refs_080.safetensors"))
with open(os.path.join(out, "info.json"), "w") as f:
    json.dump(info, f)
sys.stdout.flush()
os._exit(0)  # skip torch's slow interpreter teardown
"""


def File(path) -> Tensors:
    """A safetensors file as the pack's checkpoints are: a checkpoint view, with `.metadata` and `.source`."""
    with safe_open(path, framework="pt") as f:
        return Tensors({k: f.get_tensor(k) for k in f.keys()}, path, f.metadata() or {})


def layer(ckpt, full):
    return {k[len(full) + 1:]: v for k, v in ckpt.items() if k.startswith(full + ".")}


def run(script, release, out):
    return subprocess.Popen([sys.executable, "-c", script, release, out], cwd=out, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    missing = [r for r in ("0.3.64", "0.8.0") if r not in RELEASES]
    if missing:
        pytest.skip(f"ComfyUI {', '.join(missing)} not found under ../shared/comfyui/")
    if importlib.util.find_spec("comfy_kitchen") is None:
        pytest.skip("comfy_kitchen (ComfyUI 0.8.0's quantization kernels) is not installed")
    out = str(tmp_path_factory.mktemp("comfy_quant"))
    # One after the other: 0.8.0 reads the legacy file 0.3.64 writes (no waiting on another process's file).
    for release, script in (("0.3.64", MAKE_0364), ("0.8.0", MAKE_080)):
        p = run(script, RELEASES[release], out)
        _, err = p.communicate(timeout=900)  # bounds a hang only
        assert p.returncode == 0, f"ComfyUI {release} failed:\n{err[-4000:]}"
    return {"dir": out, "r0364": load_file(os.path.join(out, "refs_0364.safetensors")),
            "r080": load_file(os.path.join(out, "refs_080.safetensors")),
            "info": json.load(open(os.path.join(out, "info.json")))}


def open_made(made, name):
    return File(os.path.join(made["dir"], name))


def without_layer(formats):
    return {k: {kk: vv for kk, vv in v.items() if kk != "layer"} for k, v in formats.items()}


def fp8_bound(dq, source, steps):
    # absmax scaling maps the tensor's largest value to 448, where e4m3fn values are 32 apart: an error of at most
    # `steps` such spacings (1/2 rounding to nearest, 1 stochastic rounding) of absmax * 32 / 448, plus the rounding
    # of the product to bfloat16 (1/256 of absmax).
    amax = source.float().abs().max()
    assert (dq.float() - source.float()).abs().max() <= steps * amax / 14 + amax / 256


def test_scaled_fp8_file_from_comfyui_0364(made):
    """0.3.64's own scaled-fp8 file: per-tensor `scale_weight`, weight.to(dtype) * scale_weight.to(dtype), equal to
    0.3.64's `convert_weight` and to 0.8.0's dequantization of the converted layer."""
    ckpt = open_made(made, "legacy.safetensors")
    assert cq.detect(ckpt.keys(), ckpt.metadata) == "scaled_fp8"
    formats = cq.layer_formats(ckpt)
    assert without_layer(formats) == {"blocks.0.qkv": {"format": "float8_e4m3fn"},
                                      "blocks.1.fc": {"format": "float8_e4m3fn"}}
    assert without_layer(formats) == made["info"]["configs"]["legacy.safetensors"]  # as convert_old_quants says
    assert ckpt["blocks.0.qkv.scale_weight"].shape == ()  # one scale per tensor
    for name, fmt in formats.items():
        for dt in DTYPES:
            got = cq.dequantize_layer(layer(ckpt, name), fmt, dt)
            assert got.dtype == dt
            assert torch.equal(got, made["r0364"][f"{name}|{dt}"]), (name, dt)
            assert torch.equal(got, made["r080"][f"legacy.safetensors|{name}|{dt}"]), (name, dt)
        fp8_bound(got, made["r0364"][name + "|source"], 1)  # 0.3.64's set_weight rounds stochastically
    # the unscaled layer is full precision, as ComfyUI loads it
    assert torch.equal(cq.dequantize_layer(layer(ckpt, "final"), None, torch.float32),
                       made["r080"]["legacy.safetensors|final|torch.float32"])


def test_scaled_fp8_text_encoder_marker(made):
    """A text encoder's nested marker with 2 elements: the layers get full_precision_matrix_mult, as ComfyUI 0.8.0's
    convert_old_quants gives them, and dequantize to ComfyUI's weights."""
    ckpt = open_made(made, "legacy_te.safetensors")
    pre = "text_encoders.t5xxl.transformer."
    formats = cq.layer_formats(ckpt, pre)
    assert without_layer(formats) == made["info"]["configs"]["legacy_te.safetensors"] == {
        "enc.0.q": {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}}
    assert formats["enc.0.q"]["layer"] == pre + "enc.0.q"
    for dt in DTYPES:
        got = cq.dequantize_layer(layer(ckpt, pre + "enc.0.q"), formats["enc.0.q"], dt)
        assert torch.equal(got, made["r080"][f"legacy_te.safetensors|enc.0.q|{dt}"])


def test_mixed_fp8_layers(made):
    """0.8.0's own mixed file: `comfy_quant` JSON tensors, fp8 weight + float32 `weight_scale`, both fp8 kinds."""
    ckpt = open_made(made, "mixed.safetensors")
    assert cq.detect(ckpt.keys(), ckpt.metadata) == "mixed"
    formats = cq.layer_formats(ckpt)
    assert without_layer(formats) == made["info"]["configs"]["mixed.safetensors"]
    assert ckpt["blocks.0.qkv.weight"].dtype == torch.float8_e4m3fn
    assert ckpt["blocks.0.out.weight"].dtype == torch.float8_e5m2
    assert ckpt["blocks.0.qkv.weight_scale"].dtype == torch.float32 and ckpt["blocks.0.qkv.weight_scale"].numel() == 1
    for name in ("blocks.0.qkv", "blocks.0.out"):
        for dt in DTYPES:
            got = cq.dequantize_layer(layer(ckpt, name), formats[name], dt)
            assert torch.equal(got, made["r080"][f"mixed.safetensors|{name}|{dt}"]), (name, dt)
    fp8_bound(cq.dequantize_layer(layer(ckpt, "blocks.0.qkv"), formats["blocks.0.qkv"], torch.float32),
              made["r080"]["mixed.safetensors|blocks.0.qkv|source"], 0.5)


def test_mixed_header_metadata_with_prefix(made):
    """The `_quantization_metadata` header (no comfy_quant tensors), layers named with the model prefix."""
    ckpt = open_made(made, "header.safetensors")
    assert not any(k.endswith("comfy_quant") for k in ckpt)
    assert cq.detect(ckpt.keys(), ckpt.metadata) == "mixed"
    pre = "model.diffusion_model."
    formats = cq.layer_formats(ckpt, pre)
    assert without_layer(formats) == made["info"]["configs"]["header.safetensors"] == {
        "blocks.0.qkv": {"format": "float8_e4m3fn"}}
    for dt in DTYPES:
        got = cq.dequantize_layer(layer(ckpt, pre + "blocks.0.qkv"), formats["blocks.0.qkv"], dt)
        assert torch.equal(got, made["r080"][f"header.safetensors|blocks.0.qkv|{dt}"])
    # the same header with names written without the prefix (ComfyUI applies it after stripping the prefix)
    ckpt.metadata = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.qkv": {"format": "float8_e4m3fn"}}})}
    assert cq.layer_formats(ckpt, pre)["blocks.0.qkv"]["layer"] == pre + "blocks.0.qkv"


def test_nvfp4(made):
    """0.8.0's nvfp4 layer (comfy_kitchen's quantizer): uint8 codes [48, 40] (padded 40x72 -> 48x80), swizzled fp8
    block scales [128, 8], float32 weight_scale_2; equal to ComfyUI's dequantize after cropping to (out, in)."""
    ckpt = open_made(made, "mixed.safetensors")
    fmt = cq.layer_formats(ckpt)["blocks.1.mlp"]
    assert fmt["format"] == "nvfp4"
    t = layer(ckpt, "blocks.1.mlp")
    assert (t["weight"].dtype, tuple(t["weight"].shape)) == (torch.uint8, (48, 40))
    assert (t["weight_scale"].dtype, tuple(t["weight_scale"].shape)) == (torch.float8_e4m3fn, (128, 8))
    assert (t["weight_scale_2"].dtype, t["weight_scale_2"].numel()) == (torch.float32, 1)
    assert cq.dequantize_layer(t, fmt, torch.float32).shape == (48, 80)  # padded, without the layer's shape
    for dt in DTYPES:
        got = cq.dequantize_layer(t, fmt, dt, shape=(40, 72))
        assert torch.equal(got, made["r080"][f"mixed.safetensors|blocks.1.mlp|{dt}"]), dt
    # against the source: each value within one E2M1 step (at most 2 of 6) of its 16-block's scale
    source = made["r080"]["mixed.safetensors|blocks.1.mlp|source"].float()
    got = cq.dequantize_layer(t, fmt, torch.float32, shape=(40, 72))
    padded = torch.nn.functional.pad(source, (0, 8))
    block_max = padded.abs().reshape(40, 5, 16).amax(-1).repeat_interleave(16, 1)[:, :72]
    assert ((got - source).abs() <= block_max * 17 / 96 + 1e-7).all()
    # a pre_quant_scale (upstream) scales the input columns: folded into the weight
    pqs = torch.rand(72) + 0.5
    folded = cq.dequantize_layer({**t, "pre_quant_scale": pqs}, fmt, torch.float32, shape=(40, 72))
    assert torch.equal(folded, got * pqs)


def test_unquantized_layer_in_mixed_file(made):
    """A layer without comfy_quant in a mixed file is full precision: not listed, cast like ComfyUI loads it."""
    ckpt = open_made(made, "mixed.safetensors")
    formats = cq.layer_formats(ckpt)
    assert "blocks.1.proj" not in formats and set(formats) == {"blocks.0.qkv", "blocks.0.out", "blocks.1.mlp"}
    for dt in DTYPES:
        got = cq.dequantize_layer(layer(ckpt, "blocks.1.proj"), formats.get("blocks.1.proj"), dt)
        assert torch.equal(got, made["r080"][f"mixed.safetensors|blocks.1.proj|{dt}"])


def test_unknown_format_is_named(made):
    """A format ComfyUI does not define (ComfyUI 0.8.0 fails on it too) is named, with the file's layer."""
    assert made["info"]["unknown"].startswith("KeyError")  # QUANT_ALGOS[format] in 0.8.0's loader
    ckpt = open_made(made, "unknown.safetensors")
    with pytest.raises(LetterpressError, match=r"unknown\.safetensors: layer blocks\.2\.odd .*'float4_magic'"):
        cq.layer_formats(ckpt)
    with pytest.raises(LetterpressError, match=r"blocks\.2\.odd .*float4_magic"):
        cq.dequantize_layer(layer(ckpt, "blocks.2.odd"), {"format": "float4_magic", "layer": "blocks.2.odd"},
                            torch.float32)
    # formats upstream defines but this module does not dequantize are named as ComfyUI's
    with pytest.raises(LetterpressError, match=r"layer x uses ComfyUI's awq_w4a16 format"):
        cq.dequantize_layer({"weight": torch.zeros(2, 2, dtype=torch.int8)}, {"format": "awq_w4a16"} | {"layer": "x"},
                            torch.float32)
    with pytest.raises(LetterpressError, match="without a \"format\""):
        cq.check_format({"full_precision_matrix_mult": True}, "y")


def test_upstream_formats_match_comfy_kitchen(made):
    """mxfp8 (E8M0 block scales, padded to 32) and int8_tensorwise (per tensor and per row), which 0.8.0 lacks,
    equal comfy_kitchen's own dequantize()."""
    ckpt = open_made(made, "upstream.safetensors")
    formats = cq.layer_formats(ckpt)
    assert {k: v["format"] for k, v in formats.items()} == {"mx": "mxfp8", "i8": "int8_tensorwise",
                                                             "i8row": "int8_tensorwise"}
    assert ckpt["mx.weight"].shape == (64, 96) and ckpt["i8row.weight_scale"].shape == (24, 1)
    for name, shape in (("mx", (40, 72)), ("i8", (24, 40)), ("i8row", (24, 40))):
        source = made["r080"][f"upstream.safetensors|{name}|source"]
        got = cq.dequantize_layer(layer(ckpt, name), formats[name], source.dtype, shape=shape)
        assert torch.equal(got, made["r080"][f"upstream.safetensors|{name}|{source.dtype}"]), name


def test_scaled_fp8_variants_without_comfyui():
    """Legacy details ComfyUI leaves to the file: an e5m2 marker keeps e5m2 weights (as 0.3.64 loaded them), a
    per-row [out, 1] scale broadcasts, a scale of any other shape is refused, `.scale_weight` without a marker still
    counts."""
    w = torch.randn(6, 8)
    q = w.to(torch.float8_e5m2)
    ckpt = Tensors({"scaled_fp8": torch.tensor([], dtype=torch.float8_e5m2), "a.weight": q,
                    "a.scale_weight": torch.tensor(2.0)}, "x.safetensors", {})
    fmt = cq.layer_formats(ckpt)["a"]
    assert fmt == {"format": "float8_e5m2", "layer": "a"}
    assert torch.equal(cq.dequantize_layer(layer(ckpt, "a"), fmt, torch.float32), q.float() * 2)
    assert cq.detect(["b.weight", "b.scale_weight"], {}) == "scaled_fp8"
    assert cq.layer_formats({"b.weight": q, "b.scale_weight": torch.tensor(1.0)}) == {
        "b": {"format": "float8_e4m3fn", "layer": "b"}}
    rows = torch.rand(6, 1)
    got = cq.dequantize_layer({"weight": q, "weight_scale": rows}, {"format": "float8_e5m2"}, torch.float32)
    assert torch.equal(got, q.float() * rows)
    with pytest.raises(LetterpressError, match=r"scale of shape \(6,\)"):
        cq.dequantize_layer({"weight": q, "weight_scale": torch.rand(6)}, {"format": "float8_e5m2"}, torch.float32)
    # an fp8 weight in a uint8 container (QUANTIZATION.md) is reinterpreted, not converted
    boxed = cq.dequantize_layer({"weight": q.view(torch.uint8), "weight_scale": torch.tensor(2.0)},
                                {"format": "float8_e5m2"}, torch.float32)
    assert torch.equal(boxed, q.float() * 2)
    with pytest.raises(LetterpressError, match="stored as torch.float32"):
        cq.dequantize_layer({"weight": w, "weight_scale": torch.tensor(1.0)}, "float8_e4m3fn", torch.float32)


def test_nvfp4_by_the_documented_layout():
    """nvfp4 built by hand from the layout (no ComfyUI): known codes and scales decode to code value x block scale x
    global scale; the even column sits in the high nibble; block scales are read through the 128x4 tile swizzle."""
    rows, cols = 130, 64  # two row tiles, one column tile (4 blocks of 16)
    codes = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(3))
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    blocks = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0, 8.0]).repeat(rows * 4 // 6 + 1)[: rows * 4].reshape(rows, 4)
    swizzled = torch.zeros(256, 4)
    for r in range(rows):  # the cuBLAS layout, element by element
        for c in range(4):
            flat = (r // 128) * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c
            swizzled.view(-1)[flat] = blocks[r, c]
    lut = torch.tensor(cq._E2M1)
    want = lut[codes] * blocks.repeat_interleave(16, 1) * 0.125
    t = {"weight": packed, "weight_scale": swizzled.to(torch.float8_e4m3fn).view(torch.uint8),
         "weight_scale_2": torch.tensor(0.125)}
    got = cq.dequantize_layer(t, {"format": "nvfp4"}, torch.float32)
    assert torch.equal(got, want)
    with pytest.raises(LetterpressError, match="block scales"):
        cq.dequantize_layer({**t, "weight_scale": swizzled[:128]}, {"format": "nvfp4", "layer": "m"}, torch.float32)


def test_quant_keys():
    assert {"scale_weight", "scale_input", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale",
            "comfy_quant", "scaled_fp8"} <= cq.QUANT_KEYS
    assert cq.quant_suffix("blocks.0.qkv.weight_scale_2") and cq.quant_suffix("scaled_fp8")
    assert cq.quant_suffix("text_encoders.t5xxl.transformer.scaled_fp8")
    assert not cq.quant_suffix("blocks.0.qkv.weight") and not cq.quant_suffix("blocks.0.norm.scale")
    assert cq.detect(["a.weight"], {}) is None and cq.layer_formats({"a.weight": torch.zeros(1)}) == {}
