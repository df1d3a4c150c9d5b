"""Device memory a stage's forward needs beyond its weights (its activations), for the host to make room before the
stage runs. Inside ComfyUI this is load_models_gpu's `memory_required`, as ComfyUI's own KSampler and VAE Decode
pass it: ComfyUI then unloads other models, or streams part of this one's weights, instead of leaving its default
reserve (about 1 GB) and running out of memory mid-step on a card that the weights nearly fill.

The factors are peaks measured by benchmarks/real_size_accounting.py (each real architecture's bf16 forward at
1024x1024 on fake tensors), divided by batch x tokens x model width x element size (DiTs) or by pixels x element
size (VAEs), with a 25 % margin; tests/test_memory_accounting.py checks them against the same measurement at another
size. They scale with the element size of the stage's compute dtype (fp32 on CPU doubles them).
"""

from __future__ import annotations

from ..loaders import families
from ..loaders.handle import ModelHandle

# DiT activations per token of width: each family's SPEC.dit_factor (its measurement beside it).
# A DiT of a family that has not measured its factor (None) is given the largest of the others.
# VAE decode and encode: 1.61 GB / (1024 x 1024 x 2 B) = 768 values per pixel (the Flux2 and FLUX.1 decoders alike).
VAE_VALUES_PER_PIXEL = 960


def dit(handle: ModelHandle, batch: int, tokens: int, width: int) -> int:
    """Bytes of activations of one DiT forward over `batch` sequences of `tokens` tokens `width` wide."""
    return int(dit_factor(handle.family) * batch * tokens * width * handle.dtype.itemsize)


def dit_factor(family: str) -> float:
    """The family's SPEC.dit_factor; for a family without one (or not registered), the largest measured."""
    own = families.get(family).dit_factor if family in families.REGISTERED else None
    return own if own is not None else max(s.dit_factor for s in families.all() if s.dit_factor is not None)


def vae(handle: ModelHandle, batch: int, height: int, width: int) -> int:
    """Bytes of activations of a VAE decode (or encode) of `batch` images of height x width pixels."""
    return int(VAE_VALUES_PER_PIXEL * batch * height * width * handle.dtype.itemsize)
