"""LoRA loader nodes for the DiT stages: DiT + LoRA file + strength -> DiT. Chainable."""

from __future__ import annotations

from ..loaders.files import list_files, resolve
from ..loaders.host import get_host
from ..loaders.lora import check_against, read_lora
from .common import CATEGORY


def apply_lora(dit, lora_name: str, strength: float, what: str):
    lora = read_lora(resolve("loras", lora_name))
    check_against(lora, dit, what)
    return get_host().add_patches(dit, lora, strength)


def lora_loader(class_name: str, family_title: str, dit_type: str):
    """A LoRA loader node class for one family's DiT socket type."""

    class LoraLoader:
        DESCRIPTION = (f"Applies a LoRA from models/loras to the {family_title} DiT (diffusers/PEFT, DiffSynth-Studio "
                       "or ComfyUI format, detected from the keys). Chain several for stacked LoRAs; changing the "
                       "strength does not reload the model.")
        CATEGORY = f"{CATEGORY}/{family_title}"
        RETURN_TYPES = (dit_type,)
        RETURN_NAMES = ("dit",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {
                "dit": (dit_type,),
                "lora_name": (list_files("loras"), {"tooltip": "A LoRA trained for this model, in models/loras."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "0 leaves the DiT unchanged."}),
            }}

        def run(self, dit, lora_name, strength):
            return (apply_lora(dit, lora_name, strength, f"{family_title} DiT"),)

    LoraLoader.__name__ = LoraLoader.__qualname__ = class_name
    return LoraLoader
