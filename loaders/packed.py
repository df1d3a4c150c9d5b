"""A weight as a quantized file stores it: packed data, the codec of its format, its logical shape and any scales
beside it.

Each quantized format is one codec (a `Codec`), defined in that format's own module: GGUF's ggml types in
gguf_quants.py (`GgufCodec`), ComfyUI's quantized safetensors formats (scaled fp8, mixed precision) in comfy_quant.py
(`ComfyCodec`). A `Packed` holds its codec and asks it everything format-specific (its name, how to dequantize,
whether rows split or join while packed, what padding it carries), so nothing outside a format's module tells
formats apart, and a third format is one new module with one codec class. Layers that keep weights packed
(layers.QuantizedWeight) dequantize at each call; anything else dequantizes once on load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


class Codec(ABC):
    """One quantized format of one weight (e.g. ggml Q8_0; ComfyUI's nvfp4 with its layer config). Codecs compare
    equal when they stand for the same format, so packed weights of one format can join."""

    @abstractmethod
    def describe(self) -> str:
        """The format's name, for messages (Q8_0, nvfp4, ...)."""

    @abstractmethod
    def dequantize(self, raw: torch.Tensor, shape: tuple[int, ...], extras: dict, dtype: torch.dtype) -> torch.Tensor:
        """The weight `raw` (with its side tensors `extras`, on raw's device) stands for: `shape` in `dtype`."""

    def rows(self, packed: "Packed", index) -> "Packed | None":
        """Rows `index` (a slice or an index tensor) of a weight of this format, still packed; None where the
        format cannot select rows without dequantizing (its scales span rows)."""
        return None

    def cat_rows(self, parts: list["Packed"]) -> "Packed | None":
        """`parts` (the first of them of this format) stacked along their rows, still packed; None where they
        cannot be (another format among them, or a format whose rows do not join)."""
        return None

    def padded(self, stored: tuple, wanted: tuple) -> bool:
        """Whether a weight of logical shape `stored` is one of shape `wanted` with the padding this format adds
        (cropped off when it is dequantized)."""
        return False


@dataclass(frozen=True, eq=False)
class Packed:
    raw: torch.Tensor  # the packed data (a view of the file)
    codec: Codec  # its format
    shape: tuple[int, ...]  # the logical (torch) shape
    extras: dict = field(default_factory=dict)  # side tensors by suffix: weight_scale, weight_scale_2, ...

    @property
    def type_name(self) -> str:
        return self.codec.describe()

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        move = (lambda t: t) if device is None else (lambda t: t.to(device, non_blocking=True))  # noqa: E731
        return self.codec.dequantize(move(self.raw), tuple(self.shape), {k: move(v) for k, v in self.extras.items()},
                                     dtype)

    def rows(self, index) -> "Packed":
        """Some rows (a slice or an index tensor), still packed; a TypeError where the format cannot."""
        out = self.codec.rows(self, index)
        if out is None:
            raise TypeError(f"{self.codec.describe()} weights do not split by rows while packed")
        return out


def cat_rows(parts: list):
    """Tensors stacked along their rows: still packed when their codec joins them (GGUF weights of one type), else
    dequantized and concatenated (a file that mixes types, as Q4_K_M files do, within one fused weight)."""
    first = parts[0]
    joined = first.codec.cat_rows(parts) if isinstance(first, Packed) else None
    if joined is not None:
        return joined
    return torch.cat([p.dequantize() if isinstance(p, Packed) else p for p in parts])


def split_rows(t, bounds: tuple[int, int]):
    """Rows a:b of a packed or plain tensor (a plain one copied, so the fused tensor it came from can be freed; a
    packed one whose format cannot split by rows is dequantized first)."""
    a, b = bounds
    if isinstance(t, Packed):
        rows = t.codec.rows(t, slice(a, b))
        return rows if rows is not None else t.dequantize()[a:b].clone()
    return t[a:b].clone()
