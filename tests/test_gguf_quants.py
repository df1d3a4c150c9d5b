"""GGUF dequantization in torch against the `gguf` package's own numpy reference (`gguf.quants.dequantize`), for
every type the pack reads: data quantized by `gguf.quants.quantize` where the package quantizes that type, else
random blocks laid out as ggml stores them, with finite fp16 scale fields. The bound is exact equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from letterpress.loaders import gguf_quants
from letterpress.loaders.errors import LetterpressError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
# byte offsets of each K-quant block's fp16 fields (d, dmin), where random bytes must be finite numbers
FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def packed_rows(name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    qtype = Q[name]
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, per_block * blocks)).astype(np.float32), qtype)
    except NotImplementedError:
        data = rng.integers(0, 256, (rows * blocks, size), dtype=np.uint8)
        for offset in FP16_FIELDS[name]:
            scales = (rng.standard_normal(rows * blocks) * 0.01).astype(np.float16)
            data[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        return data.reshape(rows, blocks * size)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("blocks", [1, 3])
def test_every_type_dequantizes_exactly_as_the_gguf_reference(name, blocks):
    packed = packed_rows(name, 4, blocks)
    ref = gguf.quants.dequantize(packed, Q[name])
    assert np.isfinite(ref).all()
    got = gguf_quants.dequantize(torch.from_numpy(packed.copy()), int(Q[name]), ref.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape
    assert np.array_equal(got.numpy(), ref)
    assert gguf_quants.logical_shape(int(Q[name]), packed.shape) == ref.shape


def test_flat_bytes_and_other_output_dtypes():
    packed = packed_rows("Q4_K", 2, 2, seed=3)
    ref = torch.from_numpy(gguf.quants.dequantize(packed, Q.Q4_K))
    flat = torch.from_numpy(packed.copy()).reshape(-1)
    assert torch.equal(gguf_quants.dequantize(flat, int(Q.Q4_K), tuple(ref.shape), torch.bfloat16), ref.bfloat16())


@pytest.mark.parametrize("name,dtype", [("F32", np.float32), ("F16", np.float16)])
def test_unquantized_types_come_back_as_stored(name, dtype):
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(dtype)
    as_bytes = torch.from_numpy(x.copy()).reshape(-1).view(torch.uint8)
    assert torch.equal(gguf_quants.dequantize(as_bytes, int(Q[name]), (3, 8)), torch.from_numpy(x).float())
    bf = torch.randn(3, 8).bfloat16()
    assert torch.equal(gguf_quants.dequantize(bf.reshape(-1).view(torch.uint8), int(Q.BF16), (3, 8)), bf.float())


@pytest.mark.parametrize("name", ["IQ2_XXS", "TQ1_0"])
def test_other_types_are_named(name):
    with pytest.raises(LetterpressError, match=f"GGUF type {name} cannot be dequantized.*Q8_0"):
        gguf_quants.dequantize(torch.zeros(256, dtype=torch.uint8), int(Q[name]), (1, 256))
