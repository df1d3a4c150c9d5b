"""Weights quantized at load into GGUF's block types, in torch: the same bytes `gguf.quants.quantize` writes.

A stage loaded with a packed `weight_dtype` (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) has each eligible Linear weight quantized
as it is read from the file (weights.fill_module), one tensor at a time and in slices of rows, so no full-precision
copy of the model exists; the packed bytes go into the same packed layers as a GGUF file's (layers.QuantizedWeight),
so memory managers, streaming, LoRAs and training see what they see for a GGUF file.

Which weights are packed (`packs`): as GGUF converters choose (llama.cpp's convert_hf_to_gguf, ComfyUI-GGUF's
convert.py): 2-D Linear weights whose rows are whole 32-value blocks and that hold more than 1024 values (ComfyUI-GGUF's
QUANTIZATION_THRESHOLD). Everything else stays in the compute dtype: 1-D tensors (norms, biases), embeddings,
convolutions, and the small Linear layers (MoE routers, time/label embedders of a few values).

The numerics follow gguf's numpy reference step by step, in float32 (ggml's own C quantizer agrees for Q8_0; gguf's
docstring says so); every step is a separate elementwise torch op (no fused multiply-add), so CPU and GPU give the
same bytes:
- Q8_0: d = max|x| / 127, q = round-half-away(x / d)                        -> [fp16 d][32 x int8]
- Q4_0 / Q5_0: m = the value of largest magnitude (the first such), d = m / -8 (-16), q = trunc(x / d + 8.5 (16.5)),
  clipped to 0..15 (0..31)                                                  -> [fp16 d]([32-bit 5th bits])[16 nibble bytes]
- Q4_1 / Q5_1: d = (max - min) / 15 (31), q = trunc((x - min) / d + 0.5), clipped -> [fp16 d][fp16 min](...)[nibbles]
where "/ d" is "* (1 / d)" with 1/0 taken as 0, as in gguf. Nibble bytes hold value i in the low and i + 16 in the
high nibble; the 5th bits are a little-endian 32-bit word, bit i for value i.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .errors import LetterpressError
from .gguf_quants import BLOCKS, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, packed as gguf_packed
from .packed import Packed

# weight_dtype choice -> ggml type, largest first
TYPES = {"Q8_0": Q8_0, "Q5_1": Q5_1, "Q5_0": Q5_0, "Q4_1": Q4_1, "Q4_0": Q4_0}
BLOCK = 32
SMALL = 1024  # ComfyUI-GGUF keeps tensors of at most this many values unquantized
_CHUNK = 1 << 20  # values quantized at once: bounds the float32 working memory (a few 4 MiB temporaries)


def type_of(choice: str) -> int | None:
    """The ggml type a weight_dtype choice stores Linear weights in, or None for a plain dtype choice."""
    return TYPES.get(choice)


def packs(shape: tuple, qtype: int | None) -> bool:
    """Whether a Linear weight of this shape is packed in `qtype` (see the module's docstring)."""
    return (qtype is not None and len(shape) == 2 and shape[-1] % BLOCK == 0
            and shape[0] * shape[1] > SMALL)


def packed_size(shape: tuple, qtype: int) -> int:
    """Bytes a weight of this shape takes packed."""
    per_block, size = BLOCKS[qtype]
    return shape[0] * shape[1] // per_block * size


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) float32 -> (n, 2) uint8: the fp16 number's little-endian bytes."""
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """gguf's np_roundf: |x| rounded half away from zero, the sign put back."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) uint8 values 0..31 -> (n, 16): low nibble value i, high nibble value i + 16."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) uint8 values 0..31 -> (n, 4): bit 4 of value i at bit i of a little-endian 32-bit word."""
    bits = (q >> 4).reshape(-1, 4, 8).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=q.device)
    return (bits * weights).sum(-1).to(torch.uint8)


def _symmetric(b: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: (d, q) with d = the largest-magnitude value / -levels, q = trunc(x / d + levels + 0.5)."""
    imax = b.abs().argmax(dim=-1, keepdim=True)
    d = b.gather(-1, imax) / -levels
    q = (b * _inverse(d) + (levels + 0.5)).trunc().to(torch.uint8).clamp(0, 2 * levels - 1)
    return d, q


def _affine(b: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 / Q5_1: (d, min, q) with d = (max - min) / levels, q = trunc((x - min) / d + 0.5)."""
    hi, lo = b.max(dim=-1, keepdim=True).values, b.min(dim=-1, keepdim=True).values
    d = (hi - lo) / levels
    q = ((b - lo) * _inverse(d) + 0.5).trunc().to(torch.uint8).clamp(0, levels)
    return d, lo, q


def _q8_0(b):
    d = b.abs().max(dim=-1, keepdim=True).values / 127
    q = _round_half_away(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=-1)


def _q4_0(b):
    d, q = _symmetric(b, 8)
    return torch.cat([_f16_bytes(d), _nibble_bytes(q)], dim=-1)


def _q5_0(b):
    d, q = _symmetric(b, 16)
    return torch.cat([_f16_bytes(d), _fifth_bits(q), _nibble_bytes(q)], dim=-1)


def _q4_1(b):
    d, lo, q = _affine(b, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _nibble_bytes(q)], dim=-1)


def _q5_1(b):
    d, lo, q = _affine(b, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _nibble_bytes(q)], dim=-1)


_QUANT = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1}


def quantize(x: torch.Tensor, qtype: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`x` (any float dtype, last dimension whole 32-value blocks, e.g. a Linear weight or a bank of expert weights)
    as ggml `qtype` bytes: uint8 of x's shape with the last dimension in bytes, on the CPU. Computed on `device`
    (default: x's own) in slices of about 1M values, so the float32 working copy stays small."""
    if qtype not in _QUANT:
        raise LetterpressError(f"cannot quantize to ggml type {qtype}: the types offered are {', '.join(TYPES)}.")
    if x.dim() == 0 or x.shape[-1] % BLOCK:
        raise LetterpressError(f"a weight of shape {tuple(x.shape)} cannot be quantized in blocks of {BLOCK}: its rows "
                               f"are not whole blocks.")
    per_block, size = BLOCKS[qtype]
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], x.shape[-1] // per_block * size, dtype=torch.uint8)
    step = max(1, _CHUNK // x.shape[-1])
    device = x.device if device is None else torch.device(device)
    for start in range(0, rows.shape[0], step):
        part = rows[start:start + step].to(device=device, dtype=torch.float32)
        blocks = _QUANT[qtype](part.reshape(-1, per_block))
        out[start:start + step] = blocks.reshape(part.shape[0], -1).cpu()
    return out.reshape(*x.shape[:-1], -1)


def pack(weight: torch.Tensor, qtype: int, device: torch.device | str | None = None) -> Packed:
    """A weight as the packed tensor a GGUF file of type `qtype` would hold for it."""
    packed = gguf_packed(quantize(weight, qtype, device), qtype, tuple(weight.shape))
    _trim()
    return packed


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to trim
        return None


def _trim() -> None:
    """Hand the float32 slices' freed heap memory back to the system (glibc keeps freed blocks of a few MiB in its
    heap, where the packed weights allocated between them pin it: about 10 MiB a DiT block otherwise)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def compute_device() -> torch.device:
    """Where weights are quantized: the host's compute device when it is a GPU, else the CPU."""
    from .host import get_host

    device = get_host().compute_device()
    return device if device.type == "cuda" else torch.device("cpu")


def pack_loaded(model: torch.nn.Module, qtype: int) -> torch.nn.Module:
    """For a model another library has already loaded (through transformers), its layers already the
    host's (stage.choose_layers, with packed Linear layers): each Linear weight `packs` picks quantized and put back
    packed, one layer at a time (each layer's full-precision weight is freed as its packed bytes replace it; the
    loaded model itself was full precision, so such a load peaks at that size, unlike fill_module's)."""
    from . import layers

    device = compute_device()
    # a head tied to the token embeddings stays as it is, as the meta-device loaders tie it after loading
    embedded = {m.weight.untyped_storage().data_ptr() for m in model.modules() if layers.kind_of(m) == "Embedding"}
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if (isinstance(layer, layers.QuantizedWeight) and not layer.packed and isinstance(weight, torch.Tensor)
                and packs(tuple(weight.shape), qtype) and weight.untyped_storage().data_ptr() not in embedded):
            layers.load_into(layer, {"weight": pack(weight.detach(), qtype, device)}, "")
    return model
