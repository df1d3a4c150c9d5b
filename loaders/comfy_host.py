"""The host inside ComfyUI: ModelPatcher + load_models_gpu, ProgressBar, ComfyUI's interrupt and folders.

Every release difference goes through comfy_compat; this module only maps the host surface onto it.
"""

from __future__ import annotations

import dataclasses
import os

import comfy.model_management as _mm
import comfy.utils as _comfy_utils
import folder_paths as _folder_paths
import torch

from . import comfy_compat, layers
from .handle import ModelHandle, compute_dtype
from .standalone_host import FOLDER_ALIASES, TRAINED_LORAS, Progress, StandaloneHost


def register_trained_loras() -> None:
    """ComfyUI's output/loras becomes one of its LoRA folders (folder_paths.add_model_folder_path, as packs add model
    folders): the LoRAs trained there appear in every LoRA Loader's list without being moved."""
    _folder_paths.add_model_folder_path("loras", os.path.join(_folder_paths.get_output_directory(), TRAINED_LORAS))


class HostedModule(torch.nn.Module):
    """The container ComfyUI's ModelPatcher manages: it sets bookkeeping attributes on its model (device,
    lowvram flags) that diffusers and transformers models refuse, so the stage's module sits inside."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def get_dtype(self) -> torch.dtype:
        return compute_dtype(self.inner)


class ComfyHost(StandaloneHost):
    """The host inside ComfyUI: ModelPatcher + load_models_gpu, ProgressBar, ComfyUI's interrupt."""

    name = "comfyui"

    def __init__(self) -> None:
        super().__init__()
        self.output_dir = _folder_paths.get_output_directory()
        self.input_dir = _folder_paths.get_input_directory()

    def compute_device(self) -> torch.device:
        return _mm.get_torch_device()

    def offload_device(self) -> torch.device:
        return _mm.unet_offload_device()

    def layer_ops(self, weight_dtype: torch.dtype) -> layers.LayerOps:
        return comfy_compat.layer_ops(weight_dtype, self.compute_device())

    def model_class(self, cls: type) -> type:
        """A transformers model class built as a subclass whose `device` is the load device. transformers reads a
        model's device off its first parameter, and generate() moves its inputs there at every step; ComfyUI's
        managers leave the weights of streamed layers (under dynamic VRAM: of every large layer) on the offload
        device while the model computes on the load device."""
        if not isinstance(getattr(cls, "device", None), property):
            return cls
        made = self.__dict__.setdefault("_on_load_device", {})  # one subclass per model class, for this host
        if cls not in made:
            host = self
            made[cls] = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                    "device": property(lambda model: host.compute_device())})
        return made[cls]

    def wrap(self, handle: ModelHandle) -> ModelHandle:
        handle.module.to(self.offload_device())
        comfy_compat.archive_dtypes(handle.module)
        handle.patcher = comfy_compat.make_patcher(HostedModule(handle.module), self.compute_device(),
                                                   self.offload_device())
        return handle

    def add_patches(self, handle: ModelHandle, lora, strength: float) -> ModelHandle:
        patcher = handle.patcher.clone()
        # ComfyUI scales a LoRA by alpha / rank itself: alpha = scale x rank. ComfyUI owns every LoRA: ModelPatcher
        # patches on plain layers; weight wrappers on layers holding packed (quantized) weights, applied to the
        # dequantized weight at each call (a patch would be merged into the packed bytes on a full load).
        plain, packed = {}, {}
        for name, (a, b, scale) in lora.layers.items():
            target = packed if layers.is_packed(handle.module.get_submodule(name)) else plain
            target[f"inner.{name}.weight"] = comfy_compat.lora_patch(a, b, scale * a.shape[0])
        patcher.add_patches(plain, strength)
        comfy_compat.add_packed_loras(patcher, packed, strength)
        return dataclasses.replace(handle, patcher=patcher, patches=handle.patches + ((lora, strength),))

    def load(self, *handles: ModelHandle, memory_required: int = 0) -> None:
        # memory_required: the activations the stage needs, as ComfyUI's KSampler and VAE Decode pass it, so ComfyUI
        # unloads other models or streams part of these weights rather than leave only its default reserve.
        comfy_compat.load_models_gpu([h.patcher for h in handles if h.patcher is not None], memory_required)

    def free(self) -> None:
        _mm.unload_all_models()

    def loaded_models(self) -> list[str]:
        return [type(getattr(p.model, "inner", p.model)).__name__ for p in comfy_compat.loaded_patchers()]

    def loaded_bytes(self) -> int:
        return comfy_compat.loaded_bytes()

    def progress(self, total: int) -> Progress:
        return Progress(total, _comfy_utils.ProgressBar(total), self.progress_listeners, comfy_compat.progress_text)

    def request_interrupt(self, value: bool = True) -> None:
        _mm.interrupt_current_processing(value)

    def check_interrupt(self) -> None:
        _mm.throw_exception_if_processing_interrupted()

    def previews_enabled(self) -> bool:
        return comfy_compat.previews_enabled()

    def model_folders(self, kind: str) -> list[str]:
        folders: list[str] = []
        for name in FOLDER_ALIASES.get(kind, (kind,)):
            try:
                folders.extend(_folder_paths.get_folder_paths(name))
            except KeyError:
                folders.append(os.path.join(_folder_paths.models_dir, name))
        return list(dict.fromkeys(folders))  # ComfyUI's diffusion_models already holds unet (and the reverse)
