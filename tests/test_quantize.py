"""Quantizing at load (loaders/quantize.py) against gguf's own quantizer (`gguf.quants.quantize`): the same bytes for
every type both have, from bf16, fp16 and fp32 weights, 2-D and banks of experts, across the slices the quantizer
works in; and the comparison itself is shown to catch a block whose scale or rounding differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from letterpress.loaders import gguf_quants, quantize
from letterpress.loaders.errors import LetterpressError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def weights(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Random rows plus the blocks where quantizers part ways: all zeros, all equal, the largest magnitude both
    positive and negative (the first one decides the sign of d), exact halves for the rounding, a NaN-free tiny
    block (fp16 subnormal scales) and a huge one (near fp16's largest scale)."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0
    x[1, :32] = 3
    x[2, :32] = torch.linspace(-3, 3, 32)
    x[2, 7] = -3.0  # ties in magnitude with opposite signs
    x[3, :32] = torch.arange(32) - 15.5  # halves
    x[4, :32] = torch.cat([torch.tensor([127.0]), torch.arange(31) + 0.5])  # Q8_0: d = 1, every value a half
    x[5, :32] *= 1e-6
    x[6, :32] *= 1e3
    return x


def first_difference(got: np.ndarray, ref: np.ndarray, qtype) -> str | None:
    """Where two quantized tensors first differ: the block, and whether its scale (the fp16 fields) or its values
    (the rounding) do; None when the bytes are equal."""
    if got.shape != ref.shape:
        return f"shapes {got.shape} != {ref.shape}"
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    a, b = got.reshape(-1, size), ref.reshape(-1, size)
    bad = np.nonzero((a != b).any(axis=1))[0]
    if not len(bad):
        return None
    block = int(bad[0])
    scale_bytes = 4 if qtype in (Q.Q4_1, Q.Q5_1) else 2
    part = "scale" if (a[block, :scale_bytes] != b[block, :scale_bytes]).any() else "values (rounding)"
    return f"{len(bad)} blocks differ; the first, block {block}, in its {part}: {a[block]} != {b[block]}"


def assert_gguf_bytes(x: torch.Tensor, name: str) -> None:
    qtype = Q[name]
    ref = gguf.quants.quantize(x.float().numpy(), qtype)
    got = quantize.quantize(x, int(qtype)).numpy()
    problem = first_difference(got, ref, qtype)
    assert problem is None, f"{name}: {problem}"


@pytest.mark.parametrize("name", list(quantize.TYPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_bytes_are_gguf_quantizers(name, dtype):
    assert_gguf_bytes(weights().to(dtype), name)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_a_bank_of_experts_in_many_slices_gives_the_same_bytes(name, monkeypatch):
    monkeypatch.setattr(quantize, "_CHUNK", 3 * 96)  # three rows a slice: the slices' seams are in the tensor
    bank = torch.stack([weights(16, 96, seed=s) for s in range(3)]).bfloat16()  # (experts, out, in)
    assert_gguf_bytes(bank, name)
    assert quantize.quantize(bank, int(Q[name])).shape[:2] == (3, 16)


@pytest.mark.parametrize("name", list(quantize.TYPES))
def test_packed_weights_dequantize_through_the_gguf_reader(name):
    x = weights().bfloat16()
    packed = quantize.pack(x, int(Q[name]))
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.float().numpy(), Q[name]), Q[name])
    assert packed.shape == tuple(x.shape) and packed.raw.dtype == torch.uint8
    assert np.array_equal(packed.dequantize().numpy(), ref)
    assert packed.raw.numel() == quantize.packed_size(tuple(x.shape), int(Q[name]))
    assert gguf_quants.logical_shape(int(Q[name]), tuple(packed.raw.shape)) == tuple(x.shape)


def test_the_comparison_catches_a_block_whose_scale_or_rounding_differs(monkeypatch):
    """The bytes test is not vacuous: with rounding half to even (torch.round) in place of gguf's half away from
    zero, or with a scale computed as max / 127.5, it names the block and the field that differ."""
    x = weights()
    monkeypatch.setattr(quantize, "_round_half_away", torch.round)
    with pytest.raises(AssertionError, match=r"1 blocks differ.*block 32\b.*values \(rounding\)"):  # row 4, 8 blocks a row
        assert_gguf_bytes(x, "Q8_0")
    monkeypatch.undo()
    assert_gguf_bytes(x, "Q8_0")
    monkeypatch.setattr(quantize, "_symmetric", lambda b, levels: (
        (d := b.gather(-1, b.abs().argmax(-1, keepdim=True)) / -(levels + 0.01)),
        (b * quantize._inverse(d) + levels + 0.5).trunc().to(torch.uint8).clamp(0, 2 * levels - 1)))
    with pytest.raises(AssertionError, match=r"block 0\b.* in its scale"):
        assert_gguf_bytes(x[1:], "Q4_0")  # from the all-equal block on: every block's d differs


def test_which_linear_weights_are_packed():
    q8 = int(Q.Q8_0)
    assert quantize.packs((64, 128), q8)
    assert not quantize.packs((64, 128), None)  # a plain dtype choice
    assert not quantize.packs((128,), q8)  # norms, biases
    assert not quantize.packs((64, 100), q8)  # rows not whole blocks
    assert not quantize.packs((8, 64), q8)  # 512 values: as small as ComfyUI-GGUF's threshold keeps
    assert [quantize.type_of(c) for c in ("Q8_0", "Q4_0", "bf16")] == [q8, int(Q.Q4_0), None]


def test_a_weight_that_is_not_whole_blocks_is_refused_clearly():
    with pytest.raises(LetterpressError, match=r"shape \(4, 40\).*not whole blocks"):
        quantize.quantize(torch.zeros(4, 40), int(Q.Q8_0))
    with pytest.raises(LetterpressError, match="Q8_0, Q5_1"):
        quantize.quantize(torch.zeros(4, 32), int(Q.Q4_K))


_TRIM_SCRIPT = r"""
import sys
import torch
from letterpress.loaders import quantize

if sys.argv[1] == "off":
    quantize._trim = lambda: None
torch.set_num_threads(1)

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

w = torch.randn(4096, 2048).to(torch.bfloat16)  # quantized in eight float32 slices of 4 MiB
start, kept = rss(), []
for _ in range(8):
    kept.append(quantize.pack(w, quantize.TYPES["Q8_0"]))
print(rss() - start - sum(p.raw.numel() for p in kept))
"""
# glibc's own trimming of the heap top and its moving mmap threshold depend on where freed blocks happen to land (the
# control varies from 6 to 70 MiB between runs); fixed, only malloc_trim gives freed heap memory back.
_FIXED_MALLOC = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=33554432"


@pytest.mark.skipif(quantize._libc() is None or not hasattr(quantize._libc(), "malloc_trim"),
                    reason="glibc's malloc_trim only")
def test_packing_hands_the_float32_slices_memory_back():
    """pack() trims the heap: the float32 slices freed between the packed weights it keeps do not stay in the
    process (measured in fresh processes, with the trim switched off as the control: it keeps 4 to 8 MiB a weight)."""
    import os
    import subprocess
    import sys

    def overhead(mode: str) -> int:
        env = {**os.environ, "GLIBC_TUNABLES": _FIXED_MALLOC}
        out = subprocess.run([sys.executable, "-c", _TRIM_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.split()[-1])

    kept, control = overhead("on"), overhead("off")
    mib = 1 << 20
    assert kept < 16 * mib, f"{kept / mib:.1f} MiB beyond the packed weights stayed after packing"
    assert control > kept + 24 * mib, f"the control kept {control / mib:.1f} MiB: the measure shows nothing here"
