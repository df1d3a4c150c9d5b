"""Token generation with transformers' `generate()`, reporting progress per token and stopping on
Cancel within one token. Shared by the prompt enhancer, the AR-token stage and the VL models."""

from __future__ import annotations

import math

import torch

from ..loaders.errors import LetterpressError

from ..loaders.host import get_host
from .numerics import check_seed


class _HostTicks:
    """A stopping criterion that never stops: it moves the progress bar and checks for Cancel."""

    def __init__(self, total: int):
        self.host = get_host()
        self.bar = self.host.progress(total)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        self.bar.update(1)
        self.host.check_interrupt()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def check_request(max_new_tokens: int, seed: int | None) -> None:
    """Clear errors for a length or seed no generator takes (local or remote)."""
    if not max_new_tokens >= 1:
        raise LetterpressError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if seed is not None:
        check_seed(seed)


def generate(model, seed: int | None, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """`model.generate(...)` under a private RNG seeded with `seed`; returns the full sequences."""
    from transformers import StoppingCriteriaList

    check_request(max_new_tokens, seed)
    ticks = _HostTicks(max_new_tokens)
    criteria = StoppingCriteriaList([ticks] + list(kwargs.pop("stopping_criteria", []) or []))
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            return model.generate(max_new_tokens=max_new_tokens, stopping_criteria=criteria, **kwargs)
    finally:
        ticks.bar.close()


def sampling_args(temperature: float, top_p: float) -> dict:
    """temperature 0 means greedy decoding; above 0 samples with these settings. top_p 0 keeps only the most
    likely token, which is greedy decoding too (as transformers' top-p filter, which keeps at least one token)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise LetterpressError(f"temperature must be 0 (greedy) or a positive number, got {temperature}.")
    if not 0 <= top_p <= 1:
        raise LetterpressError(f"top_p must be between 0 and 1, got {top_p}.")
    if temperature == 0 or top_p == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}
