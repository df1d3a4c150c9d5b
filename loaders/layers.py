"""Which classes a stage's layers are, decided once per load, and how weights get into them.

A stage is built from diffusers' or transformers' code on the meta device with plain torch layers. Before any
weight is read, `build_layers` rebuilds every layer of a kind in `KINDS` through the constructor of the class the
host's `LayerOps` table names for it (inside ComfyUI: the comfy.ops classes `pick_operations` picks; standalone:
this module's Linear layers), so each layer has exactly the attributes its own constructor sets. Weights then go
in through each layer's own `_load_from_state_dict` (`load_into`), which is where a layer decides how a weight is
stored (fp8 storage here; ComfyUI's quantized layers do the same there).

Standalone Linear layers compute like ComfyUI's cast layers: the stored weight is cast to the input's dtype, then
passed through the layer's `lora_function` list (a LoRA at forward time, as ComfyUI's lowvram patches are), so a
LoRA never changes the stored weights and works the same on weights stored in fp8.

A layer of any host's Linear class can also keep its weight packed as a GGUF file stores it (`QuantizedWeight`,
mixed into the host's class when the file is quantized, GGUF or ComfyUI's own formats): the packed data are its
`weight` parameter (so memory managers count and move the file's bytes), dequantized on the input's device at each
call, LoRAs applied to the dequantized weight. Inside ComfyUI the host mixes in its subclass of it
(comfy_compat.CastPathPacked), which brings the bytes through ComfyUI's cast path like any of ComfyUI's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import cpu_linear

FP8 = torch.float8_e4m3fn
FP8_COMPUTE = torch.bfloat16

# The torch layer kinds a table may replace, by the name ComfyUI's op tables use for them.
KINDS: dict[str, type] = {
    "Linear": torch.nn.Linear,
    "Conv1d": torch.nn.Conv1d,
    "Conv2d": torch.nn.Conv2d,
    "Conv3d": torch.nn.Conv3d,
    "ConvTranspose1d": torch.nn.ConvTranspose1d,
    "ConvTranspose2d": torch.nn.ConvTranspose2d,
    "GroupNorm": torch.nn.GroupNorm,
    "LayerNorm": torch.nn.LayerNorm,
    "Embedding": torch.nn.Embedding,
}
if hasattr(torch.nn, "RMSNorm"):  # torch >= 2.4
    KINDS["RMSNorm"] = torch.nn.RMSNorm
_PLAIN = {cls: name for name, cls in KINDS.items()}


@dataclass(frozen=True)
class LayerOps:
    """The classes a stage's layers are built from (by kind name); the dtype their weights are stored in is the
    load's (storage.Storage, which weights.fill_module reads)."""

    name: str
    classes: dict = field(default_factory=dict)  # kind name -> class built in place of that torch kind
    packed_mixin: type | None = None  # what a Linear keeping packed weights mixes in (None: QuantizedWeight)

    def class_for(self, layer: torch.nn.Module) -> type | None:
        kind = kind_of(layer)
        return None if kind is None else self.classes.get(kind)


def kind_of(layer: torch.nn.Module) -> str | None:
    """The kind name of a plain torch layer or of a class built from one (its nearest torch base in KINDS)."""
    for cls in type(layer).__mro__:
        for name, base in KINDS.items():
            if cls is base:
                return name
    return None


def _constructor_args(layer: torch.nn.Module, kind: str) -> dict:
    """The arguments that build a layer like `layer` (the settings torch layers keep as attributes)."""
    has_bias = getattr(layer, "bias", None) is not None
    if kind == "Linear":
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=has_bias)
    if kind.startswith("Conv"):
        args = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                    stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                    bias=has_bias, padding_mode=layer.padding_mode)
        if kind.startswith("ConvTranspose"):
            args["output_padding"] = layer.output_padding
        return args
    if kind == "GroupNorm":
        return dict(num_groups=layer.num_groups, num_channels=layer.num_channels, eps=layer.eps, affine=layer.affine)
    if kind == "LayerNorm":
        return dict(normalized_shape=layer.normalized_shape, eps=layer.eps,
                    elementwise_affine=layer.elementwise_affine, bias=has_bias)
    if kind == "RMSNorm":
        return dict(normalized_shape=layer.normalized_shape, eps=layer.eps, elementwise_affine=layer.elementwise_affine)
    if kind == "Embedding":
        return dict(num_embeddings=layer.num_embeddings, embedding_dim=layer.embedding_dim,
                    padding_idx=layer.padding_idx, max_norm=layer.max_norm, norm_type=layer.norm_type,
                    scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
    raise AssertionError(kind)


def build_layers(module: torch.nn.Module, ops: LayerOps) -> torch.nn.Module:
    """Rebuild every plain torch layer of `module` whose kind `ops` names, through that class's constructor.

    The new layers are built on the meta device; a layer that already holds weights (a model transformers loaded)
    passes them to its replacement through the replacement's own loading path. A layer shared by two parents stays
    shared. Layers of other classes (a model's own norm classes, ...) are left as they are."""
    rebuilt: dict[int, torch.nn.Module] = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in rebuilt:
                kind = _PLAIN.get(type(child))  # plain torch layers only: a subclass has its own reasons
                target = ops.classes.get(kind) if kind else None
                if target is None or target is type(child):
                    continue
                rebuilt[id(child)] = _rebuild(child, target, kind)
            parent._modules[name] = rebuilt[id(child)]
    return module


def _rebuild(layer: torch.nn.Module, target: type, kind: str) -> torch.nn.Module:
    weight = getattr(layer, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
    new = target(**_constructor_args(layer, kind), device="meta", dtype=dtype)
    new.train(layer.training)
    tensors = {k: v for k, v in layer.state_dict(keep_vars=True).items() if not v.is_meta}
    if tensors:
        load_into(new, {k: v.detach() for k, v in tensors.items()}, "")
        new.requires_grad_(any(p.requires_grad for p in layer.parameters()))
    return new


def load_into(owner: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Give `owner` its own tensors (`prefix` + name -> tensor) through its `_load_from_state_dict`, assigning them
    (no copy). Returns the error messages the layer reported."""
    errors: list[str] = []
    owner._load_from_state_dict(tensors, prefix, {"assign_to_params_buffers": True}, False, [], [], errors)
    return errors


def storage_dtype(owner: torch.nn.Module, name: str, compute: torch.dtype, linear: torch.dtype | None) -> torch.dtype:
    """The dtype a floating-point tensor `name` of `owner` is handed over in (`linear`: that of Linear weights when it
    is not the compute dtype, as storage.Storage.linear says)."""
    if linear is not None and name == "weight" and kind_of(owner) == "Linear":
        return linear
    return compute


# Standalone layers ---------------------------------------------------------------------------------------------


class Linear(torch.nn.Linear):
    """A Linear built without initialising its weights (they come from the file), that casts its stored weight to
    the input's dtype and applies `lora_function` (this layer's LoRAs) at each call, as ComfyUI's cast layers apply
    their `weight_function`."""

    lora_function: list = []

    def reset_parameters(self) -> None:
        return None

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype and weight.is_floating_point():
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        for f in self.lora_function:
            weight = f(weight)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weights(x))


class OneDnnLinear(Linear):
    """A Linear whose fp32 CPU products go through oneDNN (see cpu_linear); otherwise F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, *self._weights(x))


class QuantizedWeight:
    """Mixed into a host's Linear class for a quantized file: a weight handed over as `packed.Packed` stays packed
    (its data the `weight` parameter, its scales buffers beside it, its format's codec and logical shape kept) and
    is dequantized at each call, on the input's device."""

    lora_function: list = []
    pack_codec = None  # packed.Codec of the weight's format, while it is packed
    qshape: tuple = ()
    pack_extras: tuple = ()

    @property
    def packed(self) -> bool:
        return self.pack_codec is not None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        from .packed import Packed

        value = state_dict.get(prefix + "weight")
        if isinstance(value, Packed):
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            self.weight = torch.nn.Parameter(value.raw, requires_grad=False)
            self.pack_codec, self.qshape, self.pack_extras = value.codec, tuple(value.shape), tuple(value.extras)
            for name, t in value.extras.items():
                self.register_buffer("packed_" + name, t, persistent=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def unpack(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight these packed bytes (this layer's, wherever they are now) stand for, in `dtype`, on their
        device."""
        extras = {k: getattr(self, "packed_" + k).to(raw.device) for k in self.pack_extras}
        return self.pack_codec.dequantize(raw, self.qshape, extras, dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The standalone host's path: the bytes moved to the input's device, dequantized, this layer's LoRAs
        applied. (Inside ComfyUI, comfy_compat.CastPathPacked takes them through ComfyUI's cast path instead.)"""
        if not self.packed:
            return super().forward(x, *args, **kwargs)
        weight = self.unpack(self.weight.to(x.device), x.dtype)
        for f in self.lora_function:
            weight = f(weight)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, weight, bias)


_QUANTIZED: dict[tuple[type, type], type] = {}


def quantized_class(cls: type, mixin: type | None = None) -> type:
    """`cls` able to keep packed weights, through `mixin` (QuantizedWeight or a host's subclass of it); one class
    per pair, so dynamo and pickling see stable types."""
    mixin = mixin or QuantizedWeight
    if (mixin, cls) not in _QUANTIZED:
        _QUANTIZED[mixin, cls] = type(f"Quantized{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _QUANTIZED[mixin, cls]


def with_quantized(ops: LayerOps) -> LayerOps:
    """The table for a quantized file: Linear layers keep packed weights; the other kinds get dequantized ones."""
    linear = quantized_class(ops.classes.get("Linear", torch.nn.Linear), ops.packed_mixin)
    return replace(ops, name=ops.name + "+quantized", classes={**ops.classes, "Linear": linear})


def is_packed(layer: torch.nn.Module) -> bool:
    """Whether the layer keeps its weight packed (a quantized file's, or quantized at load)."""
    return getattr(layer, "pack_codec", None) is not None


def dequantized_weight(layer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a layer computes with (a packed one dequantized), without its LoRAs."""
    if not is_packed(layer):
        return layer.weight.to(dtype)
    return layer.unpack(layer.weight, dtype)


def weight_shape(layer: torch.nn.Module) -> tuple:
    """A layer's logical weight shape (a packed weight's bytes have another)."""
    return tuple(layer.qshape) if is_packed(layer) else tuple(layer.weight.shape)


def standalone_ops(weight_dtype: torch.dtype, device: torch.device) -> LayerOps:
    """The standalone host's table: Linear layers that take LoRAs at forward time, through oneDNN for fp32 on x86
    CPUs; for fp8 (the load stores their weights in fp8: storage.Storage.linear) Linear layers that cast them to
    the input's bf16 at each call. Other kinds stay torch's."""
    fast = device.type == "cpu" and weight_dtype == torch.float32 and cpu_linear.enabled()
    return LayerOps("standalone", {"Linear": OneDnnLinear if fast else Linear})


# LoRA at forward time ------------------------------------------------------------------------------------------


class LoraPatch:
    """weight -> weight + strength x (B @ A) x scale for each LoRA on one layer, computed in fp32 and rounded to the
    weight's dtype after each, in the order the LoRAs were chained."""

    def __init__(self, deltas: Iterable[tuple[Callable[[], torch.Tensor], float]]):
        self.deltas = list(deltas)  # (lazy fp32 delta of one LoRA, strength)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        for delta, strength in self.deltas:
            weight = (weight.float() + delta().to(weight.device) * strength).to(weight.dtype)
        return weight


def set_loras(module: torch.nn.Module, patches: tuple) -> None:
    """Make the layers of `module` compute with these LoRAs ((LoraWeights, strength), ...) and no others (the
    standalone host's LoRA path; inside ComfyUI, ComfyUI's ModelPatcher owns them)."""
    state = module.__dict__.setdefault("_letterpress_loras", {"applied": None, "layers": set()})
    wanted = tuple((id(lora), float(s)) for lora, s in patches)
    if state["applied"] == wanted:
        return
    per_layer: dict[str, list] = {}
    for lora, strength in patches:
        for name in lora.layers:
            per_layer.setdefault(name, []).append(((lambda lora=lora, name=name: lora.delta(name)), float(strength)))
    for name in state["layers"] - set(per_layer):
        module.get_submodule(name).__dict__.pop("lora_function", None)  # back to the class's empty list
    for name, deltas in per_layer.items():
        layer = module.get_submodule(name)
        if not hasattr(layer, "lora_function"):
            raise TypeError(f"{name} is a {type(layer).__name__}, which takes no LoRA at forward time")
        layer.lora_function = [LoraPatch(deltas)]
    state["applied"], state["layers"] = wanted, set(per_layer)
