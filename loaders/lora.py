"""LoRA files for the DiT stages: format detection, key mapping onto the DiT's own module names, and
validation against the loaded DiT. Applying them is the host's job (ModelPatcher patches inside
ComfyUI, the standalone host's own weight patching elsewhere): see host.add_patches.

Formats:
- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, optional `.alpha`
  (also without the `transformer.` prefix); the scale comes from the file's `lora_adapter_metadata` (lora_alpha,
  alpha_pattern, use_rslora) when diffusers wrote one;
- DiffSynth-Studio: `<module>.lora_A.default.weight` / `.lora_B.default.weight` (PEFT's default adapter,
  saved with `pipe.dit.` removed, alpha = rank);
- ComfyUI style: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` or `.lora_down.weight` /
  `.lora_up.weight`, optional `.alpha`.
kohya / sd-scripts LoRAs (flattened `lora_unet_<module>` keys) are refused with a message naming these formats.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .host import LetterpressError, ModelHandle
from .weights import open_checkpoint

_PATTERNS = [
    # (format name, regex with groups: module, A/B side, alpha?)
    ("DiffSynth-Studio", re.compile(r"^(?:pipe\.dit\.)?(?P<m>.+)\.lora_(?P<s>A|B)\.default\.weight$")),
    ("ComfyUI", re.compile(r"^diffusion_model\.(?P<m>.+)\.lora_(?P<s>A|B|up|down)\.weight$")),
    ("diffusers/PEFT", re.compile(r"^(?:transformer\.|base_model\.model\.)?(?P<m>.+)\.lora_(?P<s>A|B|up|down)\.weight$")),
]
FORMATS = ("diffusers/PEFT (transformer.<layer>.lora_A.weight), DiffSynth-Studio (<layer>.lora_A.default.weight) "
           "or ComfyUI (diffusion_model.<layer>.lora_down.weight)")
_KOHYA = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_ALPHA = re.compile(r"^(?:diffusion_model\.|transformer\.|base_model\.model\.)?(?P<m>.+)\.alpha$")


@dataclass(frozen=True, eq=False)
class LoraWeights:
    name: str
    format: str
    layers: dict  # module name -> (down A (r, in), up B (out, r), scale alpha/rank)

    def delta(self, module: str, dtype=torch.float32) -> torch.Tensor:
        a, b, scale = self.layers[module]
        return (b.to(dtype) @ a.to(dtype)) * scale


@dataclass(frozen=True)
class _AdapterConfig:
    """The PEFT settings diffusers writes into a LoRA file's metadata (`lora_adapter_metadata`): lora_alpha,
    alpha_pattern and use_rslora decide each layer's scale when the file has no `.alpha` tensors."""
    lora_alpha: float | None = None
    alpha_pattern: dict | None = None
    rslora: bool = False

    @classmethod
    def of(cls, ck, name: str) -> "_AdapterConfig":
        raw = (getattr(ck, "metadata", None) or {}).get("lora_adapter_metadata")
        if not raw:
            return cls()
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise LetterpressError(f"LoRA {name}: its lora_adapter_metadata is not JSON ({e}); the file is damaged.")
        if not isinstance(meta, dict):
            return cls()
        meta = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in meta.items()}
        alpha = meta.get("lora_alpha")
        return cls(float(alpha) if isinstance(alpha, (int, float)) else None,
                   meta.get("alpha_pattern") if isinstance(meta.get("alpha_pattern"), dict) else None,
                   bool(meta.get("use_rslora")))

    def alpha(self, module: str, rank: int) -> float:
        for pattern, value in (self.alpha_pattern or {}).items():  # PEFT: the layer name or its dotted tail
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(value)
        return self.lora_alpha if self.lora_alpha is not None else rank


def read_lora(path: str) -> LoraWeights:
    ck = open_checkpoint(path)
    name = os.path.basename(path)
    config = _AdapterConfig.of(ck, name)
    sides: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    fmt = None
    unknown = []
    kohya = next((k for k in ck if k.startswith(_KOHYA)), None)
    if kohya:
        raise LetterpressError(
            f"LoRA {name} is in the kohya / sd-scripts format (lora_unet_ keys such as {kohya}), which Letterpress "
            f"does not read. Use a LoRA in a format it reads: {FORMATS}."
        )
    for key in ck:
        a = _ALPHA.match(key)
        if a:
            if ck[key].numel() != 1:
                raise LetterpressError(f"LoRA {name}: {key} holds {ck[key].numel()} values, not one alpha; the file is damaged.")
            alphas[a.group("m")] = float(ck[key].float().item())
            continue
        for fname, pattern in _PATTERNS:
            m = pattern.match(key)
            if m:
                if not ck[key].is_floating_point():
                    raise LetterpressError(f"LoRA {name}: {key} is stored as {str(ck[key].dtype).replace('torch.', '')}, "
                                           "not as floating-point weights; the file is damaged. Download it again.")
                fmt = fmt or fname
                side = {"up": "B", "down": "A"}.get(m.group("s"), m.group("s"))
                sides.setdefault(m.group("m"), {})[side] = ck[key]
                break
        else:
            unknown.append(key)
    if unknown:
        raise LetterpressError(
            f"LoRA {name}: {len(unknown)} tensors are not LoRA weights Letterpress knows "
            f"({', '.join(unknown[:5])}). Nothing was applied; use a LoRA in {FORMATS}."
        )
    if not sides:
        raise LetterpressError(f"LoRA {name} holds no LoRA weights (lora_A/lora_B or lora_down/lora_up).")
    layers = {}
    for module, ab in sides.items():
        if set(ab) != {"A", "B"}:
            raise LetterpressError(f"LoRA {name}: {module} has only its lora_{''.join(ab)} half; the file is damaged.")
        rank = ab["A"].shape[0]
        if rank == 0:
            raise LetterpressError(f"LoRA {name}: {module} has rank 0 (empty lora_A/lora_B); the file is damaged or empty.")
        if ab["B"].shape[1] != rank:
            raise LetterpressError(f"LoRA {name}: {module} has mismatched ranks {rank} and {ab['B'].shape[1]}.")
        alpha = alphas.get(module, config.alpha(module, rank))
        layers[module] = (ab["A"], ab["B"], alpha / (math.sqrt(rank) if config.rslora else rank))
    return LoraWeights(name, fmt or "diffusers/PEFT", layers)


def check_against(lora: LoraWeights, dit: ModelHandle, what: str) -> None:
    """Refuse a LoRA whose target layers or shapes the DiT does not have, naming the mismatch."""
    modules = dict(dit.module.named_modules())
    missing = [m for m in lora.layers if m not in modules or not hasattr(modules[m], "weight")]
    if missing and all(m.startswith(("double_blocks.", "single_blocks.")) for m in missing):
        raise LetterpressError(
            f"LoRA {lora.name} uses the original FLUX-style layer names ({missing[0]}), as ComfyUI's own Ovis-Image "
            "file names them; Letterpress applies LoRAs by the diffusers layer names (transformer_blocks.N.attn.to_q, "
            "...), so nothing was applied. Convert it, or use a LoRA trained with diffusers or DiffSynth-Studio.")
    if missing:
        found = len(lora.layers) - len(missing)
        kind = "another model family" if found == 0 else "a model with other layers"
        raise LetterpressError(
            f"LoRA {lora.name} was made for {kind}: the {what} has no {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(lora.layers)} targets missing)."
        )
    for m, (a, b, _) in lora.layers.items():
        w = modules[m].weight
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise LetterpressError(
                f"LoRA {lora.name} was made for another size: {m} is {tuple(w.shape)} in the {what} "
                f"but the LoRA expects {(b.shape[0], a.shape[1])}."
            )
