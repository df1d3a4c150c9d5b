"""Where ComfyUI releases differ, decided here and only here, by what the running ComfyUI has (never its version).

Imported only inside ComfyUI (by comfy_host.py). Each function names the release difference it covers. Tested in
ComfyUI 0.3.64 and 0.8.0 (see README); the dynamic-VRAM branches follow the newest upstream files as read.
"""

from __future__ import annotations

import inspect
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as model_patcher
import comfy.ops as ops
import torch

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
                           layers.FP8 if fp8 else None)


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
