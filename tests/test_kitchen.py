"""comfy-kitchen's dequantization ops (loaders/kitchen.py) against the pack's own torch code (comfy_quant.py, run with
LETTERPRESS_KITCHEN=0): the same numbers, exactly, for every ComfyUI format both have, every output dtype, with the
padding nvfp4 and mxfp8 add and the zero E8M0 exponent; and which path ran is checked, so neither side is vacuous."""

from __future__ import annotations

import pytest
import torch

from letterpress.loaders import comfy_quant, kitchen

ck = pytest.importorskip("comfy_kitchen")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def layers(seed: int = 0) -> dict[str, tuple[dict, dict]]:
    """One layer of each format, quantized by comfy-kitchen's own quantizers as ComfyUI's files are:
    name -> (its tensors, its config). 200 x 96 leaves nvfp4 and mxfp8 padding to crop."""
    x = torch.randn(200, 96, generator=torch.Generator().manual_seed(seed))
    global_scale = (x.abs().max() / (6 * 448)).float()
    fp4, fp4_scales = ck.quantize_nvfp4(x, global_scale, pad_16x=True)
    mx, mx_scales = ck.quantize_mxfp8(x, pad_32x=True)
    mx_scales = mx_scales.view(torch.uint8).clone()
    mx_scales.view(-1)[:7] = 0  # E8M0 exponent 0: ComfyUI reads it as a zero scale
    q8, q8_scale = ck.quantize_int8_tensorwise(x)
    row8, row_scale = ck.quantize_int8_rowwise(x)
    return {
        "float8_e4m3fn": ({"weight": x.to(torch.float8_e4m3fn), "weight_scale": torch.tensor(0.37)}, {}),
        "float8_e5m2": ({"weight": x.to(torch.float8_e5m2), "scale_weight": torch.tensor([1.5])}, {}),
        "nvfp4": ({"weight": fp4, "weight_scale": fp4_scales, "weight_scale_2": global_scale}, {}),
        "mxfp8": ({"weight": mx, "weight_scale": mx_scales}, {}),
        "int8_tensorwise": ({"weight": q8, "weight_scale": q8_scale}, {}),
        "int8_rowwise_scale": ({"weight": row8, "weight_scale": row_scale}, {"format": "int8_tensorwise"}),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(layers()))
def test_comfy_kitchen_and_the_torch_fallback_give_the_same_numbers(name, dtype, monkeypatch):
    tensors, conf = layers()[name]
    fmt = {"format": name, **conf}
    calls = []
    for op in ("dequantize_per_tensor_fp8", "dequantize_nvfp4", "dequantize_mxfp8", "dequantize_int8_simple"):
        real = getattr(ck, op)
        monkeypatch.setattr(ck, op, lambda *a, real=real, op=op: calls.append(op) or real(*a))
    with_kitchen = comfy_quant.dequantize_layer(tensors, fmt, dtype, (200, 96))
    assert len(calls) == 1  # comfy-kitchen's op did the work
    monkeypatch.setenv("LETTERPRESS_KITCHEN", "0")
    fallback = comfy_quant.dequantize_layer(tensors, fmt, dtype, (200, 96))
    assert len(calls) == 1 and kitchen.module() is None  # and here the torch code alone
    assert with_kitchen.dtype == fallback.dtype == dtype and with_kitchen.shape == (200, 96)
    assert torch.equal(with_kitchen, fallback)
    assert with_kitchen.float().abs().max() > 0


def test_a_dtype_comfy_kitchen_does_not_write_falls_back_to_torch():
    tensors, _ = layers()["float8_e4m3fn"]
    assert kitchen.dequantize_fp8(tensors["weight"], tensors["weight_scale"], torch.float64) is None
    out = comfy_quant.dequantize_layer(tensors, {"format": "float8_e4m3fn"}, torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, tensors["weight"].double() * tensors["weight_scale"].double())
