"""How a stage stores its weights: the `weight_dtype` widget's choice, resolved once, at the node boundary.

A loader node turns the widget's text into a `Storage` with `resolve` (for the host's compute device) and hands that
value down; the loaders, the layer table (layers.py, the hosts) and weights.fill_module read its fields and never the
text, so none of them decides what "auto" means or asks the host for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import quantize
from .errors import LetterpressError
from .layers import FP8, FP8_COMPUTE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3fn": FP8}
CHOICES = ["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", *quantize.TYPES]


@dataclass(frozen=True)
class Storage:
    """A stage's weight storage: `dtype` is what the host's layer table is asked for (the compute dtype, or fp8:
    Linear weights stored in fp8 and computed in bf16); `quant` the ggml type Linear weights are quantized to as they
    load (loaders/quantize.py), or None; `choice` the widget's value, for messages."""

    dtype: torch.dtype = torch.float32
    quant: int | None = None
    choice: str = "fp32"

    @property
    def compute(self) -> torch.dtype:
        """The dtype the stage computes in, and stores every tensor in but fp8 Linear weights."""
        return FP8_COMPUTE if self.dtype == FP8 else self.dtype

    @property
    def linear(self) -> torch.dtype | None:
        """The dtype Linear weights are stored in when it is not the compute dtype (fp8), else None."""
        return FP8 if self.dtype == FP8 else None

    def unquantized(self) -> "Storage":
        """The same storage with nothing quantized at load (VAEs: their convolutions and few Linear layers)."""
        return replace(self, quant=None)


def resolve(choice: str, device: torch.device) -> Storage:
    """The storage a weight_dtype choice means on `device`: 'auto' is fp32 on CPU, bf16 on a device that has it,
    fp16 otherwise; 'fp8_e4m3fn' stores the Linear weights in fp8 (half of bf16) and computes in bf16; a GGUF type
    (Q8_0, ..., Q4_0) computes in what 'auto' does, its Linear weights quantized at load."""
    if choice not in CHOICES:
        raise LetterpressError(f"weight_dtype '{choice}' is not one of {', '.join(CHOICES)}.")
    if choice in DTYPES:
        return Storage(DTYPES[choice], None, choice)
    if device.type == "cpu":
        dtype = torch.float32
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    return Storage(dtype, quantize.type_of(choice), choice)
