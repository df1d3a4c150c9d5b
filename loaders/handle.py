"""A loaded model stage as the nodes pass it around: what it is, its torch module, the host's bookkeeping."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its floating-point parameters not stored in fp8."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype not in _FP8:
            return p.dtype
    return torch.float32


@dataclass
class ModelHandle:
    """A loaded model stage: what it is, the torch module, and the host's bookkeeping for it."""

    family: str  # a registered family key (loaders/families.py REGISTERED)
    role: str  # "dit", "text_encoder", "vae", "prompt_enhancer", ...
    module: torch.nn.Module
    tokenizer: Any = None
    source: str = ""  # file or folder it came from, for messages
    extras: dict = field(default_factory=dict)
    patcher: Any = None  # ComfyUI ModelPatcher, or None in the standalone host
    patches: tuple = ()  # ((LoraWeights, strength), ...) applied at forward time while this handle runs

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (fp8-stored weights compute in the dtype of the other parameters)."""
        return compute_dtype(self.module)

    @property
    def device(self) -> torch.device:
        """Where the stage computes: its patcher's load device inside ComfyUI (whose managers leave the weights of
        streamed layers, and under dynamic VRAM of every large layer, on the offload device), else where its
        weights are."""
        if self.patcher is not None:
            return self.patcher.load_device
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def describe(self) -> str:
        return f"{self.family} {self.role} ({os.path.basename(self.source) or 'in memory'})"
