"""The optimizer side of LoRA training: the optimizer (torch's AdamW; bitsandbytes' AdamW 8-bit and Prodigy where
their packages are installed), the learning-rate schedule with warmup (the formulas of diffusers' get_scheduler,
which kohya's sd-scripts and ai-toolkit use too) and gradient clipping (torch's clip_grad_norm_)."""

from __future__ import annotations

import math

import torch

from ..loaders.errors import LetterpressError

WEIGHT_DECAY = 0.01  # torch's AdamW default, DiffSynth-Studio's --weight_decay default
OPTIMIZERS = ("AdamW", "AdamW 8-bit", "Prodigy")
# schedule -> the rate after warmup at `progress` (0 to 1 of the steps after warmup), as a fraction of the set one
_AFTER_WARMUP = {"constant": lambda progress: 1.0,
                 "cosine": lambda progress: max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress))),
                 "linear": lambda progress: max(0.0, 1.0 - progress)}
SCHEDULES = tuple(_AFTER_WARMUP)
# optimizer -> (module, class, the pip package that provides it)
_INSTALLED = {"AdamW 8-bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
              "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt")}


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """The optimizer `name` over `params`, weight decay 0.01. Prodigy sets its own step size: its lr is a multiplier
    (1.0 is Prodigy's recommendation). `name` is one of OPTIMIZERS (TrainingSettings.check)."""
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    module, cls, package = _INSTALLED[name]
    try:
        import importlib

        found = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise LetterpressError(f"The {name} optimizer needs the {package} package, which is not installed here: "
                               f"pip install {package} in ComfyUI's Python, or pick AdamW.") from None
    return found(params, lr=lr, weight_decay=WEIGHT_DECAY)


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0 for the first) as a fraction of the set one, as diffusers'
    get_scheduler computes it: rising linearly from 0 over `warmup` steps, then constant, falling linearly to 0 at
    `total`, or following half a cosine to 0 at `total`. `schedule` is one of SCHEDULES (TrainingSettings.check)."""
    if step < warmup:
        return step / max(1, warmup)
    return _AFTER_WARMUP[schedule]((step - warmup) / max(1, total - warmup))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int, done: int = 0):
    """torch's LambdaLR over lr_factor, counting from step `done` (the steps a resumed run took before)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, done + s, warmup, total))


def clip(params: list, max_norm: float) -> float | None:
    """Scale the gradients so their total L2 norm is at most `max_norm` (torch's clip_grad_norm_); 0 turns it off.
    The norm before clipping, for the log."""
    if max_norm <= 0:
        return None
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
