"""Where ComfyUI releases differ, decided here and only here, by what the running ComfyUI has (never its version).

Imported only inside ComfyUI (by comfy_host.py). Each function names the release difference it covers. Tested in
ComfyUI 0.3.64 and 0.8.0 (see README); the dynamic-VRAM branches follow the newest upstream files as read.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as model_patcher
import comfy.ops as ops
import torch
import torch.nn.functional as F

from . import layers

OLDEST_TESTED = "0.3.64"


def check_release() -> None:
    """A clear ImportError, at import of the pack, when this ComfyUI lacks what the pack builds on."""
    needs = {
        "comfy.ops.disable_weight_init.Linear / .Embedding": all(
            hasattr(ops.disable_weight_init, k) for k in ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding")),
        "comfy.ops.manual_cast": hasattr(ops, "manual_cast"),
        "comfy.ops.pick_operations": hasattr(ops, "pick_operations"),
        "load_models_gpu(memory_required=...)": "memory_required" in _parameters(mm.load_models_gpu),
        "ModelPatcher(model, load_device, offload_device)": hasattr(model_patcher, "ModelPatcher"),
        "comfy.weight_adapter.LoRAAdapter": _has_lora_adapter(),
    }
    missing = [what for what, ok in needs.items() if not ok]
    if missing:
        raise ImportError(f"ComfyUI-Letterpress needs ComfyUI {OLDEST_TESTED} or newer; this ComfyUI lacks "
                          f"{', '.join(missing)}. Update ComfyUI (ComfyUI-Manager: Update ComfyUI).")


def _has_lora_adapter() -> bool:
    try:
        from comfy.weight_adapter import LoRAAdapter  # noqa: F401
    except ImportError:
        return False
    return True


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _call(fn, *args, **kwargs):
    """`fn` with the keyword arguments this release's signature takes (the others dropped)."""
    names = _parameters(fn)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in names})


# Layers ------------------------------------------------------------------------------------------------------


def op_table(weight_dtype: torch.dtype, compute_dtype: torch.dtype, load_device: torch.device):
    """The comfy.ops class set ComfyUI would build one of its own models from for these dtypes on this device.

    0.3.64 takes `scaled_fp8`, 0.8.0 and later `model_config` (mixed precision); neither applies to a plain file."""
    pick = getattr(ops, "pick_operations", None)
    if pick is None:
        return ops.manual_cast if weight_dtype != compute_dtype else ops.disable_weight_init
    return _call(pick, weight_dtype, compute_dtype, load_device=load_device)


def cast_weights(layer: torch.nn.Module, input: torch.Tensor, dtype: torch.dtype, bias_dtype: torch.dtype):
    """A context giving (weight, bias) of `layer` on the input's device through this release's cast path, as
    ComfyUI's own layers take them: 0.33.0 and later `CastBiasWeightContext` (dynamic VRAM's vbar, offload
    streams), 0.8.0 `cast_bias_weight(offloadable=True)` + `uncast_bias_weight`, 0.3.64 `cast_bias_weight`."""
    context = getattr(ops, "CastBiasWeightContext", None)
    if context is not None:
        return context(layer, input, dtype=dtype, bias_dtype=bias_dtype, offloadable=True)
    if "offloadable" in _parameters(ops.cast_bias_weight):
        return _offloaded(layer, input, dtype, bias_dtype)
    return contextlib.nullcontext(ops.cast_bias_weight(layer, input, dtype=dtype, bias_dtype=bias_dtype))


@contextlib.contextmanager
def _offloaded(layer, input, dtype, bias_dtype):
    weight, bias, stream = ops.cast_bias_weight(layer, input, dtype=dtype, bias_dtype=bias_dtype, offloadable=True)
    try:
        yield weight, bias
    finally:
        ops.uncast_bias_weight(layer, weight, bias, stream)


def run_every_op() -> None:
    """What ComfyUI's layers do before each call (0.8.0 and later: Cancel between layers); 0.3.64 has none."""
    hook = getattr(ops, "run_every_op", None)
    if hook is not None:
        hook()


class CastPathPacked(layers.QuantizedWeight):
    """A Linear keeping packed (quantized) weights inside ComfyUI: its bytes come through ComfyUI's cast path
    (`cast_weights`) like the weights of ComfyUI's own layers, so the memory manager places and streams them (the
    dynamic manager's vbar slot, lowvram offload streams) and `run_every_op` applies; they arrive still packed
    (asked for in their own dtype, with the layer's weight patches kept out of ComfyUI's reach so it neither casts
    the bytes nor writes a patched weight back into them) and are dequantized here. Then every weight patch
    ComfyUI placed on the layer applies to the dequantized weight: the dynamic manager's `weight_lowvram_function`,
    the lowvram loader's and the weight wrappers' `weight_function` (where the pack's LoRAs on packed layers are,
    see add_packed_loras)."""

    def forward(self, *args, **kwargs):
        if not self.packed:
            return super().forward(*args, **kwargs)
        run_every_op()
        return self.forward_comfy_cast_weights(*args, **kwargs)

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if not self.packed:
            return super().forward_comfy_cast_weights(input, *args, **kwargs)
        lowvram = getattr(self, "weight_lowvram_function", None)
        patches = ([lowvram] if lowvram is not None else []) + list(getattr(self, "weight_function", ()))
        with _hidden(self, weight_function=[], weight_lowvram_function=None):
            with cast_weights(self, input, dtype=self.weight.dtype, bias_dtype=input.dtype) as (raw, bias):
                weight = self.unpack(raw, input.dtype)
                for f in patches:
                    weight = f(weight)
                return F.linear(input, weight, bias)


@contextlib.contextmanager
def _hidden(layer: torch.nn.Module, **values):
    """Set attributes of `layer` for the duration, then put back exactly what was there (or nothing)."""
    saved = {k: layer.__dict__[k] for k in values if k in layer.__dict__}
    layer.__dict__.update(values)
    try:
        yield
    finally:
        for k in values:
            layer.__dict__.pop(k, None)
        layer.__dict__.update(saved)


def layer_ops(weight_dtype: torch.dtype, load_device: torch.device) -> layers.LayerOps:
    """ComfyUI's op classes for every layer kind it has one for (RMSNorm only where its op builds torch's RMSNorm,
    whose numerics the models were written against)."""
    fp8 = weight_dtype == layers.FP8
    compute = layers.FP8_COMPUTE if fp8 else weight_dtype
    table = op_table(weight_dtype, compute, load_device)
    classes = {}
    for kind, torch_cls in layers.KINDS.items():
        cls = getattr(table, kind, None)
        if cls is not None and issubclass(cls, torch_cls):
            classes[kind] = cls
    return layers.LayerOps(f"comfy.ops.{getattr(table, '__name__', type(table).__name__)}", classes,
                           packed_mixin=CastPathPacked)


def archive_dtypes(module: torch.nn.Module) -> None:
    """Record each loaded parameter's and buffer's dtype as `<name>_comfy_model_dtype`, as ComfyUI does for its own
    models (`archive_model_dtypes`, 0.33.0 and later): the dynamic VRAM manager sizes each layer's slot, and casts
    what it moves there, by it. Layers built lazily keep the dtype they were built in otherwise (fp32 for a bf16
    file: a slot twice the size, the weights cast up). Releases without it do not read it."""
    archive = getattr(mm, "archive_model_dtypes", None)
    if archive is not None:
        archive(module)


# Model patcher ------------------------------------------------------------------------------------------------


def patcher_class() -> type:
    """The class ComfyUI makes its own models' patchers with. Newer releases build them through
    `comfy.model_patcher.CoreModelPatcher`, which main.py points at `ModelPatcherDynamic` when dynamic VRAM
    (comfy-aimdo) works; releases before that (0.3.64, 0.8.0) have only `ModelPatcher`."""
    return getattr(model_patcher, "CoreModelPatcher", None) or model_patcher.ModelPatcher


def make_patcher(container: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    return patcher_class()(container, load_device=load_device, offload_device=offload_device)


def lora_patch(down: torch.Tensor, up: torch.Tensor, alpha: float) -> Any:
    """One layer's LoRA as a ModelPatcher patch: comfy.weight_adapter's LoRAAdapter, the only LoRA patch
    comfy.lora.calculate_weight applies in every supported release (a ("lora", ...) tuple is only logged as
    unrecognised)."""
    from comfy.weight_adapter import LoRAAdapter

    return LoRAAdapter(set(), (up, down, alpha, None, None, None))


class PackedLora:
    """LoRA patches on one packed layer, applied by ComfyUI's own LoRA math (comfy.lora.calculate_weight) to the
    dequantized weight at each call: a ModelPatcher weight wrapper, which every load mode of every release puts in
    the layer's `weight_function` (ModelPatcher's full and lowvram loads, ModelPatcherDynamic's setup), so nothing
    is merged into the packed bytes (a ModelPatcher patch would be, on a full load)."""

    def __init__(self, key: str, patches: list):
        self.key, self.patches = key, patches  # ModelPatcher's patch list entries for this key

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches, weight, self.key)


def add_packed_loras(patcher, patches: dict, strength: float) -> None:
    """`patches` (key -> LoRAAdapter) on packed layers, as weight wrappers of this patcher (see PackedLora); a new
    patches_uuid, as add_patches gives, so ComfyUI tells this clone's weights from its parent's."""
    for key, adapter in patches.items():
        patcher.add_weight_wrapper(key, PackedLora(key, [(strength, adapter, 1.0, None, None)]))
    if patches:
        patcher.patches_uuid = uuid.uuid4()


def load_models_gpu(patchers: list, memory_required: int) -> None:
    _call(mm.load_models_gpu, patchers, memory_required=memory_required)


def loaded_patchers() -> list:
    """The ModelPatchers ComfyUI holds loaded now."""
    return [lm.model for lm in getattr(mm, "current_loaded_models", []) if getattr(lm, "model", None) is not None]


def loaded_bytes() -> int:
    return sum(lm.model_loaded_memory() for lm in getattr(mm, "current_loaded_models", [])
               if getattr(lm, "model", None) is not None)


def previews_enabled() -> bool:
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return True
    return args.preview_method != LatentPreviewMethod.NoPreviews


def progress_text(message: str) -> None:
    """Show `message` under the running node (PromptServer.send_progress_text, the text ComfyUI's own nodes show
    while they work); nothing where the release or the run (no server, no executing node) has no such channel."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if context is not None and server is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(message, context.node_id)
