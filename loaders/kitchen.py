"""comfy-kitchen (ComfyUI's kernel library, the `comfy-kitchen` pip package, usable outside ComfyUI) where it is
installed: its dequantization ops for ComfyUI's quantized formats, which pick the fastest backend for the tensors'
device (CUDA / Triton kernels on a GPU, its eager torch code elsewhere). comfy_quant.py calls these first and keeps
its own torch code as the fallback (not installed, a device or output dtype comfy-kitchen has no kernel for, or
LETTERPRESS_KITCHEN=0); tests/test_kitchen.py shows the two give the same numbers.

Each function returns the dequantized weight, padded as stored (the caller crops), or None where comfy-kitchen
cannot do it. Its quantized matrix products (scaled_mm_nvfp4 / scaled_mm_mxfp8, int8_linear) quantize the
activations too, so they compute another product than the dequantized weight times the input the reference pipelines
compute; they are not used.
"""

from __future__ import annotations

import functools
import os

import torch

_OUTPUTS = (torch.float32, torch.float16, torch.bfloat16)  # the output dtypes comfy-kitchen's ops write


@functools.cache
def _kitchen():
    try:
        import comfy_kitchen
    except ImportError:
        return None
    return comfy_kitchen


def module():
    """comfy_kitchen, or None when it is not installed or LETTERPRESS_KITCHEN=0 turns it off."""
    return None if os.environ.get("LETTERPRESS_KITCHEN", "1") == "0" else _kitchen()


def _call(op: str, dtype: torch.dtype, *args):
    ck = module()
    if ck is None or dtype not in _OUTPUTS:
        return None
    try:
        return getattr(ck, op)(*args, dtype)
    except (ck.BackendError, NotImplementedError):  # no backend for this device or input: the torch code runs
        return None


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """weight (float8_e4m3fn / e5m2) * a per-tensor scale."""
    if scale.numel() != 1:
        return None
    return _call("dequantize_per_tensor_fp8", dtype, weight, scale.reshape(()).float())


def dequantize_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor, block_scales: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor | None:
    """Packed FP4 (even column in the high nibble) with swizzled fp8 block scales and a per-tensor scale."""
    return _call("dequantize_nvfp4", dtype, weight, global_scale.reshape(()).float(),
                 block_scales.contiguous().view(torch.float8_e4m3fn))


def dequantize_mxfp8(weight: torch.Tensor, block_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """fp8 values with swizzled E8M0 block scales (stored as float8_e8m0fnu or uint8)."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is None:
        return None
    return _call("dequantize_mxfp8", dtype, weight, block_scales.contiguous().view(e8m0))


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """int8 * a per-tensor or per-row float32 scale, computed in float32 and cast."""
    ck = module()
    if ck is None:
        return None
    return ck.dequantize_int8_simple(weight, scale.float()).to(dtype)
