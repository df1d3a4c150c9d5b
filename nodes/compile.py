"""Torch Compile nodes for the DiT stages: DiT -> the same DiT, run through torch.compile by the sampler."""

from __future__ import annotations

from ..loaders.compiled import MODES, mark
from .common import CATEGORY


def compile_node(class_name: str, family_title: str, dit_type: str):
    """A Torch Compile node class for one family's DiT socket type."""

    class CompileDiT:
        DESCRIPTION = (f"Runs the {family_title} DiT through torch.compile. The first run compiles (tens of seconds "
                       "to minutes, depending on the model and machine); every later step and re-queue reuses the "
                       "compiled code while the model stays loaded. LoRAs may come before or after it. Needs a C++ "
                       "compiler on CPU and Triton on NVIDIA GPUs, as torch.compile itself does.")
        CATEGORY = f"{CATEGORY}/{family_title}"
        RETURN_TYPES = (dit_type,)
        RETURN_NAMES = ("dit",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                "dit": (dit_type,),
                "mode": (list(MODES), {"default": MODES[0], "tooltip": "torch.compile mode; max-autotune compiles "
                                       "longer to search for faster kernels (on CPU it was slower here)."}),
            }}

        def run(self, dit, mode):
            return (mark(dit, mode),)

    CompileDiT.__name__ = CompileDiT.__qualname__ = class_name
    return CompileDiT
