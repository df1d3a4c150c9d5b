"""ComfyUI's quantized .safetensors files, read without ComfyUI: which layers are quantized, and their weights.

Two conventions exist (sources: ComfyUI 0.3.64 and 0.8.0 `comfy/ops.py`, `comfy/utils.py`, `comfy/quant_ops.py`,
QUANTIZATION.md, and the newest upstream; the numerics are comfy_kitchen's eager reference, which ComfyUI's layouts
call):

"scaled fp8" (the older one; ComfyUI 0.8.0 converts it to the newer one on load, `convert_old_quants`):
    `scaled_fp8`             a marker tensor, at the root or at `<model prefix>scaled_fp8` (one per text encoder in
                             a checkpoint). Its dtype is the fp8 kind (float32 counts as float8_e4m3fn); empty means
                             fp8 matmuls allowed, 2 elements means "full precision matrix mult" (dequantize first).
    `<layer>.weight`         float8_e4m3fn (0.3.64 casts it to the marker's kind; 0.8.0 always reads e4m3fn, here
                             an e5m2 marker gives float8_e5m2 layers as 0.3.64 did), the layer's shape
    `<layer>.scale_weight`   float32, one per-tensor scale (0-dim or 1 element)
    `<layer>.scale_input`    float32 scalar activation scale (1.0 means none); it never touches the weight
    weight = weight.to(dtype) * scale_weight.to(dtype)

"mixed" (per-layer formats; ComfyUI 0.8.0 and upstream):
    `<layer>.comfy_quant`    uint8 tensor holding UTF-8 JSON {"format": ..., ...}; and/or the safetensors header
                             `__metadata__["_quantization_metadata"]` = JSON {"format_version": "1.0", "layers":
                             {<layer>: {"format": ...}}}, which wins over the tensors when both are there. A layer with
                             neither is full precision (cast to the compute dtype).
    float8_e4m3fn / float8_e5m2:  weight fp8, `weight_scale` float32 per-tensor; optional `input_scale`.
                             weight = weight.to(dtype) * weight_scale.to(dtype)
    nvfp4:                   weight uint8 [R, C/2], two FP4 E2M1 codes a byte, the even column in the HIGH nibble
                             (comfy_kitchen's `hi_first` default),
                             rows and columns zero-padded to multiples of 16; `weight_scale` float8_e4m3fn block scales
                             (one per 16 columns) in cuBLAS' swizzled tile layout, shape [ceil(R/128)*128,
                             ceil(C/64)*4]; `weight_scale_2` float32 per-tensor scale. Per 16-element block:
                             weight = E2M1[code].to(dtype) * (weight_scale_2.to(dtype) * weight_scale.to(dtype)),
                             then cropped to the layer's (out, in) shape. Upstream adds `pre_quant_scale` (the input
                             is multiplied by it; folded into the weight's columns here).
    mxfp8 (upstream):        weight float8_e4m3fn padded to multiples of 32; `weight_scale` E8M0 (float8_e8m0fnu or
                             uint8) one per 32 columns, same swizzled layout:
                             weight = (w.float() * 2**(e-127)).to(dtype)
    int8_tensorwise (upstream): weight int8, `weight_scale` float32 scalar or [out, 1]:
                             weight = (w.float() * weight_scale).to(dtype). Its "convrot" variant (Hadamard-rotated) and
                             convrot_w4a4 / asym_w4a8_int8 / awq_w4a16 are refused by name.

Where comfy-kitchen is installed its dequantization ops do the work (kitchen.py: its CUDA / Triton kernels on a GPU);
otherwise, or where it has no kernel, the code here: plain torch on the tensors' own device, vectorised, and
bit-identical to comfy_kitchen's eager reference dequantization for the same output dtype (tests/test_kitchen.py).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from . import kitchen
from .checkpoint import CheckpointView, view
from .errors import LetterpressError
from .packed import Codec

# Suffixes (the part after a layer's name) of the side tensors quantized files carry next to `<layer>.weight`, and
# the `scaled_fp8` marker itself, so a loader can drop them from a state dict once the weights are dequantized.
QUANT_KEYS = frozenset({
    "scaled_fp8",  # the legacy marker (a whole key, or `<prefix>scaled_fp8`)
    "scale_weight", "scale_input",  # legacy scaled fp8
    "comfy_quant",  # per-layer format JSON
    "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale",  # mixed precision (QUANTIZATION.md)
    "weight_zeros", "weight_s_rel", "weight_s_channel", "weight_codebook",  # upstream int4 formats
})

# Formats this module dequantizes, and the storage dtype ComfyUI casts the weight to.
_STORAGE = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "nvfp4": torch.uint8,
    "mxfp8": torch.float8_e4m3fn,
    "int8_tensorwise": torch.int8,
}
# Formats whose weights are padded to whole blocks on both sides (rows and columns), and the block.
_PADDING = {"nvfp4": 16, "mxfp8": 32}
# Formats upstream ComfyUI knows that are not dequantized here (named in the error).
_KNOWN_UNSUPPORTED = ("convrot_w4a4", "asym_w4a8_int8", "awq_w4a16")

MARKER = "scaled_fp8"
META_KEY = "_quantization_metadata"

# FP4 E2M1: sign bit, 2 exponent bits, 1 mantissa bit; codes 0-7 positive, 8-15 their negatives.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quant_suffix(key: str) -> bool:
    """Whether `key` is a quantization side tensor (or the scaled_fp8 marker) rather than a model weight."""
    return key.rpartition(".")[2] in QUANT_KEYS


def _is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def detect(keys: Iterable[str], metadata: dict | None) -> str | None:
    """'mixed' (per-layer formats), 'scaled_fp8' (the older per-tensor fp8 scales) or None (not quantized).

    As ComfyUI: the header's `_quantization_metadata` makes a file mixed whatever its keys. Unlike ComfyUI 0.8.0,
    `.scale_weight` keys without the `scaled_fp8` marker still count as scaled fp8 (ComfyUI would load their raw fp8
    numbers as weights, unscaled)."""
    if metadata and META_KEY in metadata:
        return "mixed"
    mixed = False
    scaled = False
    for k in keys:
        if _is_marker(k) or k.endswith(".scale_weight"):
            scaled = True
        elif k.endswith(".comfy_quant"):
            mixed = True
    return "scaled_fp8" if scaled else "mixed" if mixed else None


def _where(checkpoint: CheckpointView) -> str:
    return f"{os.path.basename(str(checkpoint.source))}: " if checkpoint.source else ""


def _conf(value, layer: str, where: str) -> dict:
    """One layer's config as a dict (the 0.8.0 QUANTIZATION.md example writes a bare format string)."""
    if isinstance(value, str):
        value = {"format": value}
    if not isinstance(value, dict):
        raise LetterpressError(f"{where}layer {layer} has quantization config {value!r}, not an object with a "
                               "\"format\": the file is damaged or not a ComfyUI quantized file.")
    return dict(value)


def _json_tensor(t: torch.Tensor, layer: str, where: str):
    try:
        return json.loads(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    except (ValueError, RuntimeError, TypeError) as e:
        raise LetterpressError(f"{where}{layer}.comfy_quant is not a JSON format description ({e}): the file is "
                               "damaged.") from None


def check_format(fmt: dict | str | None, layer: str = "", where: str = "") -> dict | None:
    """`fmt` as a dict, or a LetterpressError naming the format and the layer when it cannot be dequantized."""
    if fmt is None:
        return None
    layer = layer or (fmt.get("layer", "") if isinstance(fmt, dict) else "") or "?"
    fmt = _conf(fmt, layer, where)
    name = fmt.get("format")
    if name not in _STORAGE or (name == "int8_tensorwise" and fmt.get("convrot")) or fmt.get("num_experts"):
        if name is None:
            what = "has a quantization config without a \"format\""
        elif name == "int8_tensorwise" and fmt.get("convrot"):
            what = "uses ComfyUI's int8_tensorwise format with convrot (Hadamard-rotated) weights"
        elif fmt.get("num_experts"):
            what = f"is a {name} bank of {fmt.get('num_experts')} experts"
        elif name in _KNOWN_UNSUPPORTED:
            what = f"uses ComfyUI's {name} format"
        else:
            what = f"uses the quantization format {name!r}, which ComfyUI does not define either"
        raise LetterpressError(
            f"{where}layer {layer} {what}, which Letterpress cannot dequantize. Supported: "
            f"{', '.join(sorted(_STORAGE))} and ComfyUI's scaled fp8 files; use the bf16 file of the model, or one "
            "quantized to one of those formats.")
    return fmt


def layer_formats(checkpoint: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, dict]:
    """Every quantized layer under `prefix` -> its config: {"format": ..., any other fields the file gives (such as
    "full_precision_matrix_mult"), "layer": its full name in the file}. Names are relative to `prefix`.

    Read as ComfyUI reads them: the `<layer>.comfy_quant` tensors, overridden by the header's `_quantization_metadata`
    (whose layer names may be written with or without `prefix`) or, without that header, by the legacy scaled fp8
    layers (`<layer>.scale_weight`). Layers not listed are full precision. Raises LetterpressError on a format this
    module cannot dequantize, naming it and the layer."""
    checkpoint = view(checkpoint)  # a plain mapping: no metadata, no file
    metadata = checkpoint.metadata or {}
    keys = list(checkpoint.keys())
    kind = detect(keys, metadata)
    if kind is None:
        return {}
    where = _where(checkpoint)
    found: dict[str, dict] = {}  # full layer name -> config
    for k in keys:
        if k.endswith(".comfy_quant") and k.startswith(prefix):
            layer = k[: -len(".comfy_quant")]
            found[layer] = _conf(_json_tensor(checkpoint[k], layer, where), layer, where)

    if META_KEY in metadata:
        try:
            meta = metadata[META_KEY]
            meta = json.loads(meta) if isinstance(meta, (str, bytes)) else meta
        except ValueError as e:
            raise LetterpressError(f"{where}its {META_KEY} header entry is not JSON ({e}): the file is "
                                   "damaged.") from None
        layers = meta.get("layers") if isinstance(meta, dict) else None
        if not isinstance(layers, dict):
            raise LetterpressError(f"{where}its {META_KEY} header entry has no \"layers\" object: the file is damaged "
                                   "or not a ComfyUI quantized file.")
        weights = set(keys)
        for name, value in layers.items():
            if name.startswith(prefix):
                full = name
            elif prefix and f"{prefix}{name}.weight" in weights:
                full = prefix + name  # layers named without the model prefix (ComfyUI strips it before applying them)
            else:
                continue
            found[full] = _conf(value, full, where)
    elif kind == "scaled_fp8":
        regions = {}  # key prefix a marker covers -> its layer config
        for k in keys:
            if _is_marker(k):
                marker = checkpoint[k]
                conf = {"format": "float8_e5m2" if marker.dtype == torch.float8_e5m2 else "float8_e4m3fn"}
                if marker.numel() == 2:
                    conf["full_precision_matrix_mult"] = True
                regions[k[: -len(MARKER)]] = conf
        for k in keys:
            if k.endswith(".scale_weight") and k.startswith(prefix):
                layer = k[: -len(".scale_weight")]
                covering = [r for r in regions if layer.startswith(r)]
                found[layer] = dict(regions[max(covering, key=len)]) if covering else {"format": "float8_e4m3fn"}

    out = {}
    for full, conf in found.items():
        if not full.startswith(prefix):
            continue
        conf = check_format(conf, full, where)
        conf["layer"] = full
        out[full[len(prefix):]] = conf
    return out


@functools.cache
def _pair_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: a packed byte -> its (even, odd) column values, the even column in the high nibble."""
    lut = torch.tensor(_E2M1, dtype=dtype)
    byte = torch.arange(256)
    return torch.stack([lut[byte >> 4], lut[byte & 15]], dim=1).to(device)


def _unswizzle(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS' tiled layout to [rows, cols]. A tile holds 128 rows x 4 columns as 512 bytes:
    row r, column c sit at (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4; tiles follow row-major over
    (r // 128, c // 4)."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    tiles = scales.reshape(row_tiles, col_tiles, 32, 4, 4)  # [row tile, col tile, r % 32, r % 128 // 32, c % 4]
    full = tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * 128, col_tiles * 4)
    return full[:rows, :cols]


def _need(tensors: Mapping[str, torch.Tensor], key: str, fmt: str, layer: str) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise LetterpressError(f"layer {layer} is {fmt} but has no {key} tensor: the file is incomplete or damaged.")
    return t


def _as_storage(weight: torch.Tensor, storage: torch.dtype, fmt: str, layer: str) -> torch.Tensor:
    """The weight in the format's storage dtype: 8-bit containers are reinterpreted, another fp8 kind is converted
    (as ComfyUI does); anything else does not hold this format."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if weight.dtype == storage:
        return weight
    if weight.dtype in (torch.uint8, torch.int8):  # a byte container (QUANTIZATION.md: "uint8 container for fp8")
        return weight.view(storage)
    if weight.dtype in fp8 and storage in fp8:
        return weight.to(storage)
    raise LetterpressError(f"layer {layer} is {fmt} but its weight is stored as {weight.dtype}: the file is damaged or "
                           "its quantization config is wrong.")


def _per_tensor(scale: torch.Tensor, weight: torch.Tensor, layer: str) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.dim() == weight.dim() and all(s in (1, w) for s, w in zip(scale.shape, weight.shape)):
        return scale  # e.g. [out, 1]: broadcasts as ComfyUI's product would
    raise LetterpressError(f"layer {layer} has a scale of shape {tuple(scale.shape)} for a weight of shape "
                           f"{tuple(weight.shape)}; ComfyUI's fp8 formats use one scale per tensor.")


def _crop(weight: torch.Tensor, shape, layer: str) -> torch.Tensor:
    if shape is None or tuple(weight.shape) == tuple(shape):
        return weight
    shape = tuple(shape)
    if len(shape) != weight.dim() or any(s > w for s, w in zip(shape, weight.shape)):
        raise LetterpressError(f"layer {layer} holds a weight of shape {tuple(weight.shape)}, which cannot hold the "
                               f"layer's shape {shape}: the file is not for this model.")
    return weight[tuple(slice(0, s) for s in shape)]


def dequantize_layer(tensors: Mapping[str, torch.Tensor], fmt: dict | str | None, dtype: torch.dtype,
                     shape: Iterable[int] | None = None) -> torch.Tensor:
    """The full-precision weight of one layer, in `dtype`, on the weight's device.

    `tensors` are the layer's own keys without the layer prefix ("weight", "weight_scale", "scale_weight", ...);
    `fmt` its config from `layer_formats` (None: an unquantized layer, just cast); `shape` the layer's logical shape,
    to crop the padding nvfp4 (16) and mxfp8 (32) add, as ComfyUI crops to (out_features, in_features)."""
    weight = tensors.get("weight")
    layer = (fmt.get("layer") if isinstance(fmt, dict) else None) or "?"
    if weight is None:
        raise LetterpressError(f"layer {layer} has no weight tensor: the file is incomplete or damaged.")
    fmt = check_format(fmt, layer)
    if fmt is None:
        return _crop(weight.to(dtype), shape, layer)
    name = fmt["format"]
    w = _as_storage(weight, _STORAGE[name], name, layer)

    if name in ("float8_e4m3fn", "float8_e5m2"):
        scale = tensors.get("weight_scale", tensors.get("scale_weight"))
        if scale is None:
            raise LetterpressError(f"layer {layer} is {name} but has no weight_scale (or scale_weight) tensor: the "
                                   "file is incomplete or damaged.")
        scale = _per_tensor(scale.to(w.device), w, layer)
        out = kitchen.dequantize_fp8(w, scale, dtype)
        if out is None:
            out = w.to(dtype) * scale.to(torch.float32).to(dtype)
    elif name == "int8_tensorwise":
        scale = _per_tensor(_need(tensors, "weight_scale", name, layer).to(w.device), w, layer)
        out = kitchen.dequantize_int8(w, scale, dtype)
        if out is None:
            out = (w.float() * scale.float()).to(dtype)
    elif name == "nvfp4":
        if w.dim() != 2:
            raise LetterpressError(f"layer {layer} is nvfp4 with a {w.dim()}-D weight; only 2-D weights are supported.")
        rows, cols = w.shape[0], w.shape[1] * 2
        if cols % 16:
            raise LetterpressError(f"layer {layer} is nvfp4 with {cols} columns, not a multiple of the 16-value "
                                   "block: the file is damaged.")
        swizzled = _need(tensors, "weight_scale", name, layer).to(w.device)
        _check_swizzled(swizzled, rows, cols // 16, name, layer)
        global_scale = _need(tensors, "weight_scale_2", name, layer).to(w.device)
        if global_scale.numel() != 1:
            raise LetterpressError(f"layer {layer} has a weight_scale_2 of shape {tuple(global_scale.shape)}; nvfp4 "
                                   "uses one per-tensor scale.")
        out = kitchen.dequantize_nvfp4(w, global_scale, swizzled, dtype)
        if out is None:  # the torch fallback unswizzles the scales itself (only here: this runs at every call)
            blocks = _unswizzle(swizzled.contiguous().view(torch.float8_e4m3fn), rows, cols // 16)
            values = torch.nn.functional.embedding(w.to(torch.int32), _pair_table(w.device, dtype))  # [R, C/2, 2]
            scale = global_scale.reshape(()).to(torch.float32).to(dtype) * blocks.to(dtype)  # [R, C/16]
            out = (values.reshape(rows, cols // 16, 16) * scale.unsqueeze(-1)).reshape(rows, cols)
    else:  # mxfp8
        if w.dim() != 2 or w.shape[1] % 32:
            raise LetterpressError(f"layer {layer} is mxfp8 with a weight of shape {tuple(w.shape)}; it must be 2-D "
                                   "with columns in blocks of 32.")
        rows, cols = w.shape
        swizzled = _need(tensors, "weight_scale", name, layer).to(w.device)
        _check_swizzled(swizzled, rows, cols // 32, name, layer)
        out = kitchen.dequantize_mxfp8(w, swizzled, dtype)
        if out is None:
            exps = _unswizzle(swizzled.contiguous().view(torch.uint8), rows, cols // 32).to(torch.int32)
            scale = torch.where(exps == 0, 0, exps << 23).view(torch.float32)  # E8M0 -> 2**(e - 127), 0 as ComfyUI
            out = (w.float().reshape(rows, cols // 32, 32) * scale.unsqueeze(-1)).reshape(rows, cols).to(dtype)

    out = _crop(out, shape, layer)
    pre = tensors.get("pre_quant_scale")
    if pre is not None and name == "nvfp4":  # upstream multiplies the input by it: the same as scaling the columns
        if pre.numel() != out.shape[-1]:
            raise LetterpressError(f"layer {layer} has a pre_quant_scale of {pre.numel()} values for {out.shape[-1]} "
                                   "input columns; pass the layer's shape to crop the padding first.")
        out = out * pre.to(device=out.device, dtype=dtype).reshape(1, -1)
    return out


def _check_swizzled(scales: torch.Tensor, rows: int, cols: int, fmt: str, layer: str) -> None:
    """That `scales` hold ComfyUI's swizzled block scales of a `rows` x `cols`-block weight, in 8-bit values."""
    need = -(-rows // 128) * 128 * (-(-cols // 4) * 4)
    if scales.numel() != need:
        raise LetterpressError(
            f"layer {layer} is {fmt} with {scales.numel()} block scales where ComfyUI's swizzled layout for a "
            f"{rows}-row weight with {cols} blocks a row holds {need}: the file is damaged or uses another layout.")
    if scales.element_size() != 1:
        raise LetterpressError(f"layer {layer} has {fmt} block scales stored as {scales.dtype}, not as 8-bit values.")


@dataclass(frozen=True)
class ComfyCodec(Codec):
    """One layer's ComfyUI format (its config from `layer_formats`) as a packed weight's codec: dequantized with its
    scale tensors by `dequantize_layer`. Its scales span rows (per tensor, or per block in a swizzled layout), so
    rows neither split nor join while packed."""

    config: dict

    def describe(self) -> str:
        return str(self.config.get("format"))

    def dequantize(self, raw, shape, extras, dtype):
        return dequantize_layer({"weight": raw, **extras}, self.config, dtype, shape)

    def logical_shape(self, stored: tuple) -> tuple:
        """The shape of the weight stored as `stored` (nvfp4: two 4-bit values a byte; padding kept)."""
        if self.config.get("format") == "nvfp4":
            return (stored[0], stored[1] * 2)
        return tuple(stored)

    def padded(self, stored: tuple, wanted: tuple) -> bool:
        block = _PADDING.get(self.config.get("format"))
        return (block is not None and stored != wanted and len(stored) == len(wanted) == 2
                and all(w <= st < w + block for st, w in zip(stored, wanted)))
