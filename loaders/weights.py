"""Memory-mapped safetensors reading and meta-device module building.

A module is built on the meta device (no random weights are allocated), its layers are rebuilt as the classes
the host chooses (stage.choose_layers, layers.py), then `fill_module` gives every layer its tensors, read from the
checkpoint, through its own loading path, so at no point are two full copies of the weights in memory. Filling chooses
nothing and asks no host: it stores each tensor as the `Storage` (storage.py) and the layers already chosen say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import struct
import traceback
import weakref
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

from . import comfy_quant, layers, quantize
from .checkpoint import CheckpointView, DerivedView, view
from .errors import LetterpressError
from .files import PICKLE_EXTENSIONS, SHARD, read_json, readable
from .gguf_file import GgufCheckpoint, is_gguf
from .gguf_llm import LlamaCppNames, is_llama_cpp_llm
from .packed import Packed
from .storage import Storage

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Bits per element of every dtype the safetensors format defines (the ones torch lacks are read by safetensors).
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
            "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
            "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


# First bytes of weight formats that are not safetensors (a safetensors file starts with its header length).
_OTHER_FORMATS = {b"GGUF": "a GGUF file (the ComfyUI-GGUF pack loads those)", b"PK": "a PyTorch pickle (zip) checkpoint",
                  b"\x80\x02": "a PyTorch pickle checkpoint", b"\x89HDF": "an HDF5 (Keras) file"}


def _not_safetensors(name: str, head: bytes, why: str) -> LetterpressError:
    """A file that does not parse as safetensors: another weight format under a .safetensors name, or damage."""
    other = _OTHER_FORMATS.get(head[:4]) or _OTHER_FORMATS.get(head[:2])
    if other:
        return LetterpressError(f"{name} is {other}, not a safetensors file, whatever its name says. Letterpress "
                                "loads .safetensors only: use the .safetensors release of this model.")
    return LetterpressError(f"{name} is not a valid safetensors file ({why}). Download it again.")


def _check_safetensors(path: str) -> tuple[dict, int]:
    """Read and validate the header of a safetensors file: (header, offset of the data), or a clear error for
    the usual breakages (cut short, garbage, entries that do not describe the bytes they point at)."""
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise LetterpressError(
            f"{os.path.basename(path)} is a pickle checkpoint, which can run arbitrary code when loaded. "
            "Letterpress loads .safetensors only: use the .safetensors release of this model."
        )
    name = os.path.basename(path)
    with readable(path):
        size = os.path.getsize(path)
        if size == 0:
            raise LetterpressError(f"{name} is empty (0 bytes): the download did not finish. Download it again.")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _not_safetensors(name, head, "too short")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise _not_safetensors(name, head, "corrupt header")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise _not_safetensors(name, head, "unreadable header")
    problem = _header_problem(header)
    if problem:
        raise LetterpressError(f"{name} has a corrupt header ({problem}). Download it again.")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LetterpressError(
            f"{name} is truncated: it holds {size} bytes but its header needs {8 + n + end}. "
            "The download did not finish; download it again."
        )
    return header, 8 + n


def _header_problem(header) -> str | None:
    """What is wrong with a parsed safetensors header, or None."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__}, not an object"
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return "__metadata__ is not a map of text to text"
    for key, info in header.items():
        problem = None if key == "__metadata__" else _entry_problem(info)
        if problem:
            return f"tensor {key}: {problem}"
    return None


def _is_size(x) -> bool:
    return type(x) is int and x >= 0  # not a bool, not a float


def _entry_problem(info) -> str | None:
    if not isinstance(info, dict):
        return "its entry is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_BITS:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} is not [start, end] with 0 <= start <= end"
    bits = _ST_BITS[dtype]
    need = math.prod(shape) * bits // 8
    if bits % 8 == 0 and offsets[1] - offsets[0] != need:  # sub-byte types are packed: not checked
        return f"{dtype} of shape {shape} takes {need} bytes, but its data_offsets span {offsets[1] - offsets[0]}"
    return None


class Checkpoint(CheckpointView):
    """A lazy, read-only state dict over one or more safetensors files (a checkpoint.CheckpointView).

    Tensors are zero-copy views of a private (copy-on-write) memory map of the file: loading costs no
    copy, pages are read when first used, and nothing written to a tensor ever reaches the file.
    """

    def __init__(self, files: Iterable[str]):
        self.files = list(files)
        self._info: dict[str, tuple[str, dict, int]] = {}
        self.metadata: dict = {}
        for path in self.files:
            header, start = _check_safetensors(path)
            self.metadata.update(header.get("__metadata__") or {})
            for key, info in header.items():
                if key != "__metadata__":
                    self._info[key] = (path, info, start)
        # Held weakly: a mapping lives as long as a tensor views it, never because the checkpoint is kept.
        self._maps: weakref.WeakValueDictionary[str, mmap.mmap] = weakref.WeakValueDictionary()
        self._handles: dict[str, object] = {}
        self.source = self.files[0] if len(self.files) == 1 else os.path.dirname(self.files[0])

    def file_of(self, key: str) -> str:
        return self._info[key][0]

    def shape(self, key: str) -> tuple:
        return tuple(self._info[key][1]["shape"])

    def __getitem__(self, key: str) -> torch.Tensor:
        path, info, start = self._info[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        offset = start + begin
        if dtype is None or end == begin or offset % torch.empty((), dtype=dtype).element_size():
            handle = self._handles.get(path)  # unusual dtype or alignment: let safetensors copy it
            if handle is None:
                handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
            return handle.get_tensor(key)
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                mm = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset).view(info["shape"])

    def names(self):
        return self._info.keys()

    def release(self, key: str) -> None:
        """Drop the pages of `key`'s data from this process's memory once it is no longer viewed (it was quantized
        into a copy): the whole pages inside its byte range only, which no other tensor shares. A later read pages
        them in again from the file (the map is private and never written)."""
        path, info, start = self._info[key]
        mm = self._maps.get(path)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = (start + o for o in info["data_offsets"])
        first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()


def open_checkpoint(path: str) -> Checkpoint:
    """A safetensors or GGUF file, or a folder of (possibly sharded) safetensors files."""
    if not os.path.exists(path):
        raise LetterpressError(f"{path} does not exist.")
    if os.path.isfile(path) and is_gguf(path):
        ck = GgufCheckpoint(path)
        return LlamaCppNames(ck) if is_llama_cpp_llm(ck) else ck  # a text encoder: under transformers' names
    if os.path.isdir(path):
        with readable(path):
            names = sorted(os.listdir(path))
        _check_shards(path, names)
        files = [os.path.join(path, f) for f in names if f.endswith(".safetensors") and not f.startswith(".")]
        if not files:
            pickles = [f for f in names if f.endswith(PICKLE_EXTENSIONS)]
            hint = " It only holds pickle files, which Letterpress does not load." if pickles else ""
            raise LetterpressError(f"{path} holds no .safetensors weights.{hint}")
        return _comfy_quantized(Checkpoint(files), path)
    return _comfy_quantized(Checkpoint(_shards_of(path)), path)


def _shards_of(path: str) -> list[str]:
    """Every shard of a sharded checkpoint when `path` is one of them (a DiT loader lists the first), else `path`."""
    m = SHARD.match(os.path.basename(path))
    if not m:
        return [path]
    n = int(m.group("n"))
    shards = [os.path.join(os.path.dirname(path), f"{m.group('stem')}-{i:05}-of-{n:05}.safetensors") for i in range(1, n + 1)]
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        raise LetterpressError(f"{os.path.basename(path)} is shard {int(m.group('i'))} of {n}, and {missing[0]} is not "
                               "beside it: the download is incomplete. Download the missing shards.")
    return shards


class ComfyQuantized(DerivedView):
    """A checkpoint in ComfyUI's quantized formats (scaled fp8, mixed precision: see comfy_quant.py) under its plain
    names: each quantized layer's `weight` is a `Packed` carrying its format's codec (comfy_quant.ComfyCodec) and
    scale tensors, the side tensors themselves are not listed, and every other tensor is the file's."""

    def __init__(self, ck: "Checkpoint", formats: dict[str, dict]):
        super().__init__(ck)
        self.quantized = True
        self.codecs = {layer: comfy_quant.ComfyCodec(fmt) for layer, fmt in formats.items()}
        self._keys = dict.fromkeys(k for k in ck if not comfy_quant.quant_suffix(k))

    def _codec(self, key: str) -> "comfy_quant.ComfyCodec | None":
        return self.codecs.get(key[: -len(".weight")]) if key.endswith(".weight") else None

    def __getitem__(self, key: str):
        codec = self._codec(key)
        if codec is None:
            return self.base[key]
        layer = key[: -len(".weight")]
        extras = {s: self.base[f"{layer}.{s}"] for s in sorted(comfy_quant.QUANT_KEYS)
                  if f"{layer}.{s}" in self.base}
        extras.pop("comfy_quant", None)
        return Packed(self.base[key], codec, self.shape(key), extras)

    def shape(self, key: str) -> tuple:
        codec = self._codec(key)
        shape = self.base.shape(key)
        return codec.logical_shape(shape) if codec is not None else shape

    def names(self):
        return self._keys.keys()


def _comfy_quantized(ck: "Checkpoint", path: str):
    """`ck` itself, or the view of a ComfyUI quantized file (scaled fp8 / mixed precision) over it; a format that
    cannot be dequantized is named (and no mapping of the file is left behind)."""
    if comfy_quant.detect(ck.keys(), ck.metadata) is None:
        return ck
    try:
        formats = comfy_quant.layer_formats(ck)
    except LetterpressError:
        ck.close()
        raise
    return ComfyQuantized(ck, formats) if formats else ck


def _check_shards(folder: str, names: list[str]) -> None:
    """Every shard a `*.safetensors.index.json` in the folder lists is there, once any of them is (an index left
    beside a consolidated file, with none of its shards, is stale and ignored, as transformers does)."""
    for index in (os.path.join(folder, f) for f in names if f.endswith(".safetensors.index.json")):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LetterpressError(f"{index} has no weight_map: download it again.")
        shards = sorted(set(map(str, weight_map.values())))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing and len(missing) < len(shards):
            raise LetterpressError(
                f"{missing[0]} listed in {index} is missing: the download is incomplete. Download {missing[0]} again."
            )


def strip_prefix(keys: Iterable[str], marker: str) -> str:
    """The prefix that stands before `marker` in the key list ('' when the keys start with it)."""
    for k in keys:
        if k.endswith(marker) or marker in k:
            return k[: k.index(marker)]
    return ""


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with parameters on the meta device (buffers stay real, as they are computed)."""
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None:
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = torch.nn.Parameter(module._parameters[name].to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_empty(factory: Callable[[], torch.nn.Module], config_file: str | None = None) -> torch.nn.Module:
    """`factory()` on the meta device. `config_file`: the config.json its settings came from, named in a clear
    error when they do not build the model (a value of the wrong type, a size that does not divide, ...)."""
    try:
        with empty_weights():
            return factory()
    except (TypeError, ValueError, ZeroDivisionError) as e:  # what a bad value in a config raises; not bugs
        if config_file is None:
            raise
        raise LetterpressError(f"{config_file}: its settings do not build the model ({type(e).__name__}: {e}). "
                               "The file is damaged or was edited: download it again.") from e


def fill_module(
    module: torch.nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    key_map: Callable[[str], str | None] = lambda k: k,
    storage: Storage = Storage(),
    keep_fp32: tuple[str, ...] = (),
    what: str = "model",
    optional: tuple[str, ...] = (),
    source: str = "",
    quantize_on: torch.device | None = None,
    expected: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Assign every parameter and persistent buffer of `module` from `checkpoint`, tensor by tensor, into the layers
    `module` already has (stage.choose_layers chose them), stored as `storage` says.

    `expected`: what the file must hold (the module's tensors by name, for their shapes), read off the model as its own
    code built it, before its layers were chosen: a host's layer class may create its tensors only when they are
    loaded, as upstream ComfyUI's do under dynamic VRAM (default: the module's state dict as it is now).

    `key_map` maps a checkpoint key to the module's key (None drops it). Missing or unexpected keys
    raise a LetterpressError naming them, since they mean the file is not the model the loader expects.
    `storage.quant`: a ggml type the Linear weights `quantize.packs` are quantized to as they are read (on
    `quantize_on`, the CPU if None), kept packed as a GGUF file's (weights already packed in the file stay as they are).
    """
    checkpoint = view(checkpoint, source)
    try:
        if expected is None:
            expected = dict(module.state_dict(keep_vars=True))
        return _fill(module, checkpoint, key_map, storage, keep_fp32, what, optional, quantize_on, expected)
    except BaseException as e:
        # A load that fails halfway leaves nothing behind: the module's tensors (views of the file's memory
        # map) are dropped, the checkpoint's maps closed and the failed frames' locals cleared, so no mapping
        # outlives the error, even while its traceback is kept.
        module.to("meta")
        checkpoint.close()
        checkpoint = None  # this frame stays in the traceback: let it hold no tensors of the file
        traceback.clear_frames(e.__traceback__)
        raise


def _fill(module, checkpoint: CheckpointView, key_map, storage, keep_fp32, what, optional, quantize_on, expected):
    dtype, quant = storage.compute, storage.quant  # Linear weights are stored as `storage.linear` says
    owners = dict(module.named_modules(remove_duplicate=False))
    given: dict[str, dict[str, torch.Tensor]] = {}  # owner module name -> its tensors, by full key
    seen: set[str] = set()
    unexpected: list[str] = []
    # file -> whether any sampled weight in it is not zero. Trained weights never are, norm weights are about 1,
    # while a file whose download was preallocated and never filled is zeros throughout.
    nonzero: dict[str, bool] = {}
    for ck in checkpoint.keys():
        mk = key_map(ck)
        if mk is None:
            continue
        if mk not in expected:
            unexpected.append(ck)
            continue
        target = expected[mk]
        tensor = checkpoint[ck]
        if isinstance(tensor, Packed) and tensor.codec.padded(tuple(tensor.shape), tuple(target.shape)):
            tensor = dataclasses.replace(tensor, shape=tuple(target.shape))  # e.g. nvfp4/mxfp8 pad rows and columns
        if tuple(tensor.shape) != tuple(target.shape):
            raise LetterpressError(
                f"{what}: tensor {ck} has shape {tuple(tensor.shape)} but the model needs {tuple(target.shape)}. "
                "The file is of another size or variant than its config says."
            )
        owner_name, _, leaf = mk.rpartition(".")
        if isinstance(tensor, Packed) and not (leaf == "weight" and isinstance(owners[owner_name],
                                                                                   layers.QuantizedWeight)):
            tensor = tensor.dequantize(dtype)  # small tensors of other layers (norms, embeddings) load dequantized
        if isinstance(target, torch.nn.Parameter) and target.is_floating_point():
            name = os.path.basename(checkpoint.file_of(ck) or "") or "the checkpoint"
            if not isinstance(tensor, Packed) and not tensor.is_floating_point():
                raise LetterpressError(
                    f"{what}: tensor {ck} in {name} is stored as {str(tensor.dtype).replace('torch.', '')}, but it is "
                    "a weight, which is floating point: the file is corrupt. Download it again."
                )
            sample = _sample(tensor) if not isinstance(tensor, Packed) else _sample_packed(tensor)
            if not bool(torch.isfinite(sample).all()):
                raise LetterpressError(
                    f"{what}: tensor {ck} in {name} holds NaN/inf values: the file is corrupt (a damaged "
                    "download or disk). Download it again."
                )
            nonzero[name] = nonzero.get(name, False) or bool(sample.any())
        if (quant is not None and leaf == "weight" and isinstance(tensor, torch.Tensor)
                and isinstance(owners[owner_name], layers.QuantizedWeight) and quantize.packs(tensor.shape, quant)):
            tensor = quantize.pack(tensor, quant, quantize_on or torch.device("cpu"))
            checkpoint.release(ck)  # the file's pages of it: no full-precision copy stays behind
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            want = torch.float32 if any(s in mk for s in keep_fp32) else dtype
            tensor = tensor.to(layers.storage_dtype(owners[owner_name], leaf, want, storage.linear))
        given.setdefault(owner_name, {})[mk] = tensor
        seen.add(mk)
    for name, any_nonzero in nonzero.items():
        if not any_nonzero:
            raise LetterpressError(
                f"{name}: every weight value sampled from it (the first and last values of each tensor) is zero, so "
                "the download is incomplete (an interrupted download leaves the file full of zeros). Download it again."
            )
    missing = [k for k in expected if k not in seen and not any(s in k for s in optional)]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors it does not know (e.g. {', '.join(unexpected[:3])})")
        raise LetterpressError(f"{what}: the checkpoint does not match: {'; '.join(parts)}.")
    for owner_name, tensors in given.items():
        problems = layers.load_into(owners[owner_name], tensors, owner_name + "." if owner_name else "")
        if problems:
            raise LetterpressError(f"{what}: {owner_name or 'the model'} did not take its weights: {problems[0]}")
    for name, p in list(module.named_parameters()):
        if p.is_meta and not any(s in name for s in optional):
            raise LetterpressError(f"{what}: parameter {name} was not filled from the checkpoint.")
    module.requires_grad_(False)
    return module


def _sample_packed(tensor: Packed) -> torch.Tensor:
    """The first and last rows of a packed weight, dequantized: the same check as `_sample` makes."""
    rows = tensor.shape[0] if len(tensor.shape) >= 2 else 0
    parts = [tensor.codec.rows(tensor, slice(0, 1)), tensor.codec.rows(tensor, slice(rows - 1, rows))] if rows else []
    if not parts or parts[0] is None:  # a format whose scales span rows (ComfyUI's: per tensor or block)
        return _sample(tensor.dequantize())
    return torch.cat([p.dequantize().reshape(-1) for p in parts])


def _sample(tensor: torch.Tensor, width: int = 256) -> torch.Tensor:
    """The first and last `width` values of a weight (all of a small tensor), in fp32, to check for NaN/inf and
    all-zero data. Garbage bytes are NaN/inf one time in 256 (fp32, bf16) or 32 (fp16), so garbage over any whole
    tensor, or over the start or end of one, is caught; a preallocated file the download never filled is zeros.
    It reads two pages per tensor, so the memory map stays lazy (a full check of a large model would take as long
    as the load itself, and page in the whole file)."""
    flat = tensor.reshape(-1)
    if flat.numel() > 2 * width:
        flat = torch.cat([flat[:width], flat[-width:]])
    return flat.float()
