"""fp32 Linear layers on CPU through oneDNN instead of torch's default BLAS (the standalone host's CPU path).

torch computes an fp32 `nn.Linear` on CPU with the BLAS it was built with (MKL in the PyPI wheels). oneDNN, which
torch also ships and already uses for convolutions and bf16 matmuls, reaches a higher fp32 GEMM rate on CPUs
where MKL does not pick its fastest kernels (AMD: 1.3-1.5x on the project machine's EPYC, and ~3x for the
one-row products of token-by-token decoding). Same math, different summation order: outputs differ from
MKL's at float rounding (~1e-6 relative), as two BLAS libraries do.

The standalone host builds fp32 Linear layers on CPU as `layers.OneDnnLinear`, which calls `linear` here. Each call
still falls back to `F.linear` when oneDNN does not
apply: another device, another dtype (bf16 already goes to oneDNN; fp8 storage has its own layer), a bias that
is not one dense row, autograd, autocast, `torch.backends.mkldnn.enabled = False`, or a product so small that
oneDNN's per-call overhead outweighs it. Weights are read as they are at each call, so a LoRA patched in place
is followed. Inside `torch.compile` the product goes through a custom op (inductor's own lowering of the oneDNN
op wants frozen weights). `LETTERPRESS_ONEDNN_LINEAR=0` keeps torch's default. Used on x86 CPUs only, where it
was measured.
"""

from __future__ import annotations

import logging
import os
import platform

import torch
import torch.nn.functional as F

# Below this many multiply-adds per call (rows x in x out) oneDNN's fixed overhead (~8 us) costs more than its
# faster kernel gains (measured: (1, 768) x (768, 256) is slower, (1, 256) x (256, 16512) 3x faster).
MIN_MACS = 1 << 22


def _supported() -> bool:
    # Measured only on x86 (AMD); elsewhere (Arm, Apple) torch's own BLAS is left alone.
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _turned_off() -> bool:
    return os.environ.get("LETTERPRESS_ONEDNN_LINEAR", "1").strip().lower() in ("0", "false", "off", "no")


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _register_op():
    """The oneDNN product as an opaque op for torch.compile (once per process, whichever copy of the pack)."""
    if hasattr(torch.ops.letterpress, "onednn_linear"):
        return torch.ops.letterpress.onednn_linear

    @torch.library.custom_op("letterpress::onednn_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _onednn(x, weight, bias)

    @onednn_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return torch.ops.letterpress.onednn_linear


def _op_or_none():
    """The op, or None (Linear layers then stay torch's) if this torch cannot register it: never an import error."""
    if not _supported():
        return None
    try:
        return _register_op()
    except Exception as e:  # an older or unusual torch build
        logging.getLogger("letterpress").info("oneDNN Linear layers not used: %s", e)
        return None


_COMPILED_OP = _op_or_none()


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.layout == torch.strided and weight.is_contiguous()
            # oneDNN reads the bias as one dense row: anything else goes to F.linear
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.dim() == 1
                                  and bias.is_contiguous()))
            # the oneDNN op has no backward (training, e.g. a LoRA with trainable biases, stays on F.linear)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
            and not _autocast_cpu() and torch.backends.mkldnn.enabled)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 spelling
        return torch.is_autocast_cpu_enabled()


def enabled() -> bool:
    """Whether Linear layers should take this path here (x86 CPU with oneDNN, not turned off)."""
    return _COMPILED_OP is not None and not _turned_off()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through oneDNN where it applies and pays (see the module docstring)."""
    # The size test first: it is the cheapest, and it sends token-by-token decoding straight to F.linear.
    if x.numel() * weight.shape[0] < MIN_MACS or not _applies(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _COMPILED_OP(x, weight, bias)
    return _onednn(x, weight, bias)
