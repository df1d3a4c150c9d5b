"""GGUF checkpoints (the quantized single files ComfyUI-GGUF users download) as a lazy state dict.

The `gguf` package's reader memory-maps the file (copy-on-write: nothing written to a tensor reaches the file).
Tensor names are those of the model's single .safetensors file (a `model.diffusion_model.` prefix, as some converters
write, is dropped, as ComfyUI-GGUF drops it); each tensor's logical shape is its GGUF dimensions reversed (torch
order), or the `comfy.gguf.orig_shape.<name>` field where a converter recorded the original shape. F32, F16 and BF16
tensors come back as torch tensors viewing the file; quantized ones as `packed.Packed` (bytes, their ggml type's
codec gguf_quants.GgufCodec, logical shape), which the layers that store them dequantize per call (layers.py) and
everything else dequantizes on load.
"""

from __future__ import annotations

import os
import struct
import warnings

import torch

from . import gguf_quants
from .checkpoint import CheckpointView
from .errors import LetterpressError
from .gguf_quants import type_name

PREFIX = "model.diffusion_model."
_F32, _F16, _BF16 = 0, 1, 30  # ggml type ids of the unquantized float types
DENSE = {_F32: torch.float32, _F16: torch.float16, _BF16: torch.bfloat16}


def unsupported(qtype: int, where: str) -> LetterpressError:
    names = ", ".join(sorted(type_name(t) for t in gguf_quants.SUPPORTED))
    return LetterpressError(
        f"{where} is quantized as {type_name(qtype)}, which Letterpress cannot dequantize (it reads {names}). Use a "
        "file of one of those types (e.g. Q8_0, Q6_K, Q5_K_M or Q4_K_M).")


def _name(path: str) -> str:
    return os.path.basename(path)


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path, "c")
    except (ValueError, KeyError, IndexError, struct.error, EOFError, OSError, TypeError) as e:
        raise LetterpressError(
            f"{_name(path)} is not a readable GGUF file ({type(e).__name__}: {e}). It is damaged or the download did "
            "not finish: download it again.") from None


class GgufCheckpoint(CheckpointView):
    """A read-only state dict over one GGUF file (a checkpoint.CheckpointView; see the module docstring)."""

    def __init__(self, path: str):
        self.files = [path]
        self.source = path
        reader = _reader(path)
        self.metadata = {"gguf.architecture": _string_field(reader, "general.architecture") or ""}
        names = [t.name for t in reader.tensors]
        strip = PREFIX if any(n.startswith(PREFIX) for n in names) else ""
        self._tensors = {}
        for t in reader.tensors:
            if strip and not t.name.startswith(strip):
                continue
            self._tensors[t.name[len(strip):]] = t
        if not self._tensors:
            raise LetterpressError(f"{_name(path)} is not a readable GGUF file (it holds no tensors). It is damaged "
                                   "or the download did not finish: download it again.")
        self._shapes = {key: _logical_shape(reader, t) for key, t in self._tensors.items()}
        self._reader = reader
        for key, t in self._tensors.items():  # every type is checked before anything loads
            if int(t.tensor_type) not in DENSE and int(t.tensor_type) not in gguf_quants.SUPPORTED:
                raise unsupported(int(t.tensor_type), f"{_name(path)}: tensor {key}")
        self.quantized = any(int(t.tensor_type) not in DENSE for t in self._tensors.values())
        size = os.path.getsize(path)
        for key, t in self._tensors.items():
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise LetterpressError(f"{_name(path)} is truncated: tensor {key} ends at byte {end} of {size}. The "
                                       "download did not finish; download it again.")

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def qtype(self, key: str) -> int:
        return int(self._tensors[key].tensor_type)

    def int_field(self, name: str) -> int | None:
        """A whole-number metadata field (e.g. `llama.attention.head_count`), or None when absent or not a number."""
        field = self._reader.get_field(name) if self._reader is not None else None
        if field is None or not field.data:
            return None
        try:
            return int(field.parts[field.data[-1]][0])
        except (IndexError, TypeError, ValueError):
            return None

    def __getitem__(self, key: str):
        t = self._tensors[key]
        shape = self._shapes[key]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)
        qtype = int(t.tensor_type)
        if qtype in DENSE:
            return data.reshape(-1).view(torch.uint8).view(DENSE[qtype]).reshape(shape)
        return gguf_quants.packed(data.view(torch.uint8), qtype, shape)

    def names(self):
        return self._tensors.keys()

    def close(self) -> None:
        self._tensors = {}
        self._reader = None


def _string_field(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def _logical_shape(reader, tensor) -> tuple[int, ...]:
    field = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
    if field is not None and field.data:
        return tuple(int(field.parts[i][0]) for i in field.data)
    return tuple(int(v) for v in reversed(tensor.shape))


def is_gguf(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
