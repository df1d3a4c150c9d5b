"""Resuming LoRA training: the side file a saved LoRA gets (`<name>.training_state` beside `<name>.safetensors`: the
optimizer's state, the step count and the loss record) and reading a saved LoRA back as the start of a run.

A run resumed from step N replays the choices of steps 1..N from its seed (the same images, noise and timesteps
are skipped over), so with the same settings it continues exactly as the uninterrupted run would have."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..loaders.errors import LetterpressError

STATE_SUFFIX = ".training_state"  # not a weight extension: no LoRA Loader lists it


def state_path(lora_path: str) -> str:
    return os.path.splitext(lora_path)[0] + STATE_SUFFIX


def to_cpu(value):
    """A copy of an optimizer state dict with its tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def save_state(lora_path: str, state: dict) -> None:
    torch.save(state, state_path(lora_path))


@dataclass
class Resume:
    """Where a run starts: the LoRA's factors (layer -> (A, B)), its settings, the steps done, and the optimizer
    state and loss record of its side file (None and empty without one)."""

    path: str
    family: str
    rank: int
    alpha: float
    factors: dict
    step: int
    optimizer: dict | None = None
    log: list = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    def check(self, rank: int, alpha: float, targets: list[str], total: int) -> None:
        """The run's settings must be those the LoRA was trained with, and leave steps to do."""
        name = os.path.basename(self.path)
        if (rank, float(alpha)) != (self.rank, self.alpha):
            raise LetterpressError(f"{name} was trained at rank {self.rank}, alpha {self.alpha:g}; this run asks for "
                                   f"rank {rank}, alpha {alpha:g}. Set rank and alpha to the file's to resume it.")
        if sorted(targets) != sorted(self.targets):
            raise LetterpressError(f"{name} trains {len(self.targets)} layers, this run's layers / target_modules "
                                   f"pick {len(targets)}: choose the layers it was trained on to resume it.")
        if self.step >= total:
            raise LetterpressError(f"{name} has done {self.step} steps already; this run has {total}. Set more steps "
                                   "(or epochs) to continue it.")


def load(path: str, family: str) -> Resume:
    """A LoRA this pack saved (diffusers/PEFT format) and its side file, as the start of a run."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    name = os.path.basename(path)
    if meta.get("letterpress_family") != family or "lora_adapter_metadata" not in meta:
        raise LetterpressError(f"{name} is not a {family} LoRA saved by Train LoRA in the diffusers/PEFT format: "
                               "resume from a file Save LoRA (diffusers/PEFT), a checkpoint or a cancelled run wrote.")
    config = json.loads(meta["lora_adapter_metadata"])
    factors = {}
    for key in keys:
        if key.endswith(".lora_A.weight"):
            layer = key[len("transformer."): -len(".lora_A.weight")]
            factors[layer] = (tensors[key], tensors[f"transformer.{layer}.lora_B.weight"])
    state = torch.load(state_path(path), weights_only=True) if os.path.isfile(state_path(path)) else {}
    return Resume(path, family, int(config["transformer.r"]), float(config["transformer.lora_alpha"]), factors,
                  int(state.get("step", meta.get("letterpress_steps", 0))), state.get("optimizer"),
                  list(state.get("log", [])))
