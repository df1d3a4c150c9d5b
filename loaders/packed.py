"""A weight as a quantized file stores it: packed data, its format, its logical shape and any scales beside it.

Two file kinds produce them: GGUF (gguf_file.py; the format is a ggml type id, dequantized by gguf_quants.py) and
ComfyUI's quantized safetensors (scaled fp8 and mixed precision; the format is ComfyUI's per-layer config, with
`weight_scale`-style tensors, dequantized by comfy_quant.py). Layers that keep them packed (layers.QuantizedWeight)
dequantize at each call; anything else dequantizes once on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class Packed:
    raw: torch.Tensor  # the packed data (a view of the file)
    fmt: Any  # int: a ggml type (GGUF); dict: a ComfyUI layer config ({"format": ...})
    shape: tuple[int, ...]  # the logical (torch) shape
    extras: dict = field(default_factory=dict)  # side tensors by suffix: weight_scale, weight_scale_2, ...

    @property
    def type_name(self) -> str:
        return dequantizer(self.fmt).describe(self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        move = (lambda t: t) if device is None else (lambda t: t.to(device, non_blocking=True))  # noqa: E731
        return dequantize(move(self.raw), self.fmt, self.shape, {k: move(v) for k, v in self.extras.items()}, dtype)

    def rows(self, index: slice) -> "Packed":
        """Some rows, still packed (GGUF: a row is whole blocks)."""
        if not isinstance(self.fmt, int):
            raise TypeError("only GGUF weights split by rows while packed")
        raw = self.raw.reshape(self.shape[0], -1)[index]
        return Packed(raw, self.fmt, (raw.shape[0], *self.shape[1:]))


class _Gguf:
    @staticmethod
    def describe(fmt) -> str:
        from .gguf_file import type_name

        return type_name(fmt)

    @staticmethod
    def dequantize(raw, fmt, shape, extras, dtype):
        from . import gguf_quants

        return gguf_quants.dequantize(raw, fmt, shape, dtype)


class _Comfy:
    @staticmethod
    def describe(fmt) -> str:
        return str(fmt.get("format"))

    @staticmethod
    def dequantize(raw, fmt, shape, extras, dtype):
        from . import comfy_quant

        return comfy_quant.dequantize_layer({"weight": raw, **extras}, fmt, dtype, shape)


def dequantizer(fmt):
    return _Gguf if isinstance(fmt, int) else _Comfy


def dequantize(raw: torch.Tensor, fmt, shape, extras: dict, dtype: torch.dtype) -> torch.Tensor:
    return dequantizer(fmt).dequantize(raw, fmt, tuple(shape), extras, dtype)


def cat_rows(parts: list):
    """Tensors stacked along their rows: still packed when all are GGUF-packed alike, else dequantized and
    concatenated (a file that mixes types, as Q4_K_M files do, within one fused weight)."""
    first = parts[0]
    if all(isinstance(p, Packed) and isinstance(p.fmt, int) and p.fmt == first.fmt and p.shape[1:] == first.shape[1:]
           for p in parts):
        raw = torch.cat([p.raw.reshape(p.shape[0], -1) for p in parts])
        return Packed(raw, first.fmt, (raw.shape[0], *first.shape[1:]))
    return torch.cat([p.dequantize() if isinstance(p, Packed) else p for p in parts])


def split_rows(t, bounds: tuple[int, int]):
    """Rows a:b of a packed or plain tensor (a plain one copied, so the fused tensor it came from can be freed; a
    packed one that cannot split by rows is dequantized first)."""
    a, b = bounds
    if isinstance(t, Packed):
        return t.rows(slice(a, b)) if isinstance(t.fmt, int) else t.dequantize()[a:b].clone()
    return t[a:b].clone()
