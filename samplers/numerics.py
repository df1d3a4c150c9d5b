"""Checks on numbers: stage outputs (so an fp16 overflow surfaces as a clear error rather than a black image) and
seeds."""

from __future__ import annotations

import logging

import torch

from ..loaders.errors import LetterpressError

log = logging.getLogger("letterpress")


def check_finite(x: torch.Tensor, stage: str, dtype: torch.dtype) -> torch.Tensor:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        if dtype == torch.float16:
            fix = "load the model with weight_dtype bf16 or fp32 (fp16 overflows in this model)"
        elif dtype == torch.float32:
            fix = "check the inputs of this stage (a LoRA, a shift or strength far out of range, a broken file)"
        else:
            fix = "check the inputs of this stage; if it persists, load it in fp32"
        raise LetterpressError(f"The {stage} produced {bad} non-finite values (NaN/inf) running in {str(dtype).replace('torch.', '')}: {fix}.")
    return x


def warn_truncated(n_tokens: int, limit: int, what: str) -> None:
    if n_tokens > limit:
        log.warning("%s: the prompt is %d tokens; the encoder keeps the first %d, so %d tokens are dropped.",
                    what, n_tokens, limit, n_tokens - limit)


def check_seed(seed: int) -> None:
    """Seeds are what torch's generators take: 0 .. 2^64-1."""
    if not 0 <= seed < 2**64:
        raise LetterpressError(f"seed must be between 0 and 2^64-1, got {seed}.")
