"""GGUF (ggml) tensor data dequantized in torch: vectorised over all blocks at once, on whatever device the packed
bytes are (CPU or GPU), computed in float32 and cast at the end.

ggml stores a quantized row as consecutive blocks; every block holds its scale(s) and its packed values:
- Q8_0 (32 values, 34 bytes): fp16 scale d, 32 int8 values; x = d * q.
- Q4_0 / Q4_1 (32 values): fp16 d (Q4_1: and fp16 min m), 16 bytes of 4-bit values, low nibbles the first 16
  values, high nibbles the last 16; x = d * (q - 8) (Q4_0) or d * q + m (Q4_1).
- Q5_0 / Q5_1: as Q4_0 / Q4_1 with a 32-bit word of fifth bits (bit i for value i); x = d * (q - 16) or d * q + m.
- K-quants (256 values per super-block, QK_K): sub-blocks of 16 or 32 values with their own scales, packed in the
  super-block with an fp16 d (and dmin):
  Q2_K: 16 4-bit scale/min pairs, 2-bit values, x = d * sc * q - dmin * m;
  Q3_K: a bit mask of high bits, 2-bit low bits, 16 6-bit signed scales in 12 bytes, x = d * (sc - 32) * (q - 4 * !h);
  Q4_K / Q5_K: 8 6-bit scale/min pairs in 12 bytes, 4-bit values (Q5_K: plus a fifth bit), x = d * sc * q - dmin * m;
  Q6_K: 4 low bits + 2 high bits per value, 16 int8 scales, x = d * sc * (q - 32).
The byte layouts follow ggml's block structs as the `gguf` package documents and reads them (its numpy reference,
`gguf.quants`, is what the tests compare against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LetterpressError
from .packed import Codec, Packed

QK_K = 256
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30
_DENSE = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
# type -> (values per block, bytes per block)
BLOCKS = {Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
          Q2_K: (QK_K, 84), Q3_K: (QK_K, 110), Q4_K: (QK_K, 144), Q5_K: (QK_K, 176), Q6_K: (QK_K, 210)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block as an fp16 number, in float32: (n, 2) uint8 -> (n, 1)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(n, k, width) packed bytes -> (n, k, 2 * width): low nibbles first, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(*qs.shape[:-1], 2 * width)


def _bits(word: torch.Tensor, count: int) -> torch.Tensor:
    """(n, 4) little-endian uint32 bytes -> (n, count) of its bits, bit i at index i."""
    value = word.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((value >> torch.arange(count, device=word.device)) & 1).to(torch.uint8)


def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:], 16).float() - 8)


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], 16).float() + _f16(b[:, 2:4])


def _q5(b, offset):
    q = _nibbles(b[:, offset + 4:], 16) | (_bits(b[:, offset:offset + 4], 32) << 4)
    return q.float()


def _q5_0(b):
    return _f16(b[:, :2]) * (_q5(b, 2) - 16)


def _q5_1(b):
    return _f16(b[:, :2]) * _q5(b, 4) + _f16(b[:, 2:4])


def _shifted(q: torch.Tensor, shifts: tuple[int, ...], width: int, mask: int) -> torch.Tensor:
    """(n, k*width) bytes -> (n, k, len(shifts), width): each byte's bit field at every shift."""
    n = q.shape[0]
    s = torch.tensor(shifts, dtype=torch.uint8, device=q.device).view(1, 1, -1, 1)
    return (q.reshape(n, -1, 1, width) >> s) & mask


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _shifted(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, raw, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _shifted(raw[:, :8], (0, 4), 8, 0x0F).reshape(n, 16)
    high = _shifted(raw[:, 8:], (0, 2, 4, 6), 4, 0x03).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int16) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _shifted(qs, (0, 2, 4, 6), 32, 3).reshape(n, 16, 16).to(torch.int16)
    qh = _shifted(hmask, tuple(range(8)), 32, 1).reshape(n, 16, 16).to(torch.int16)
    return (dl * (ql - 4 * (1 - qh)).float()).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins (4 in the low 6 bits of bytes 0-3 / 4-7, 4 split
    between bytes 8-11's nibbles and the top 2 bits of bytes 0-3 / 4-7)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _shifted(b[:, 16:], (0, 4), 32, 0x0F).reshape(n, 8, 32).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    ql = _shifted(b[:, 48:], (0, 4), 32, 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 16:48], tuple(range(8)), 32, 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _shifted(ql, (0, 4), 64, 0x0F).reshape(n, -1, 32)
    high = _shifted(qh, (0, 2, 4, 6), 32, 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


_DEQUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1,
            Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}
SUPPORTED = frozenset({*_DENSE, *_DEQUANT})


def type_name(qtype: int) -> str:
    """The ggml type's name (Q8_0, Q4_K, ...), as the `gguf` package spells it."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return f"ggml type {qtype}"


def logical_shape(qtype: int, byte_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of packed data whose last dimension is `byte_shape[-1]` bytes of blocks."""
    if qtype in _DENSE:
        return tuple(byte_shape[:-1]) + (byte_shape[-1] // _DENSE[qtype].itemsize,)
    per_block, size = BLOCKS[qtype]
    return tuple(byte_shape[:-1]) + (byte_shape[-1] // size * per_block,)


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed GGUF data (uint8 bytes, any shape, or an already typed F32/F16/BF16 tensor) -> `shape` in `dtype`."""
    qtype = int(qtype)
    if qtype in _DENSE:
        if raw.dtype == torch.uint8:
            raw = raw.contiguous().reshape(-1).view(_DENSE[qtype])
        return raw.reshape(shape).to(dtype)
    if qtype not in _DEQUANT:
        names = ", ".join(type_name(t) for t in sorted(SUPPORTED))
        raise LetterpressError(f"GGUF type {type_name(qtype)} cannot be dequantized here (supported: {names}). Use a "
                               "file of one of those types (e.g. Q8_0, Q6_K, Q5_K_M or Q4_K_M).")
    per_block, size = BLOCKS[qtype]
    blocks = raw.reshape(-1).view(torch.uint8).reshape(-1, size)
    return _DEQUANT[qtype](blocks).reshape(shape).to(dtype)


@dataclass(frozen=True)
class GgufCodec(Codec):
    """A ggml type as a packed weight's format: a row of the weight is whole blocks of bytes, so rows split and join
    without dequantizing."""

    qtype: int

    def describe(self) -> str:
        return type_name(self.qtype)

    def dequantize(self, raw, shape, extras, dtype):
        return dequantize(raw, self.qtype, shape, dtype)

    def rows(self, packed, index):
        raw = packed.raw.reshape(packed.shape[0], -1)[index]
        return Packed(raw, self, (raw.shape[0], *packed.shape[1:]))

    def cat_rows(self, parts):
        if not all(isinstance(p, Packed) and p.codec == self and p.shape[1:] == parts[0].shape[1:] for p in parts):
            return None
        raw = torch.cat([p.raw.reshape(p.shape[0], -1) for p in parts])
        return Packed(raw, self, (raw.shape[0], *parts[0].shape[1:]))


def packed(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> Packed:
    """GGUF bytes of ggml type `qtype` standing for a weight of logical `shape`."""
    return Packed(raw, GgufCodec(int(qtype)), tuple(shape))
