"""LoRA files for the DiT stages: format detection, key mapping onto the DiT's own module names, and
validation against the loaded DiT. Applying them is the host's job (ModelPatcher patches inside
ComfyUI; elsewhere the layers apply them at forward time, see layers.set_loras): see add_patches.

Formats:
- diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, optional `.alpha`
  (also without the `transformer.` prefix); the scale comes from the file's `lora_adapter_metadata` (lora_alpha,
  alpha_pattern, use_rslora) when diffusers wrote one;
- DiffSynth-Studio: `<module>.lora_A.default.weight` / `.lora_B.default.weight` (PEFT's default adapter,
  saved with `pipe.dit.` removed, alpha = rank);
- ComfyUI style: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` or `.lora_down.weight` /
  `.lora_up.weight`, optional `.alpha`;
- kohya / sd-scripts: `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha` (OneTrainer:
  `lora_transformer_...`), matched to the DiT's layers by their flattened names.
Layer names are the DiT's own (diffusers) names, or a family's original checkpoint names where the pack converts
those checkpoints (ComfyUI's FLUX-style `double_blocks.N.img_attn.qkv`, ...), converted by the same plan
that converts the weights (see `for_dit`). LoRAs with text-encoder layers (`lora_te_...`, `text_encoder....`) are
refused: only the DiT is patched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointView, Tensors
from .errors import LetterpressError
from .handle import ModelHandle
from .layers import weight_shape
from .weights import open_checkpoint

_PATTERNS = [
    # (format name, regex with groups: module, A/B side, alpha?)
    ("kohya", re.compile(r"^(?:lora_unet_|lora_transformer_)(?P<m>[^.]+)\.lora_(?P<s>up|down)\.weight$")),
    ("DiffSynth-Studio", re.compile(r"^(?:pipe\.dit\.)?(?P<m>.+)\.lora_(?P<s>A|B)\.default\.weight$")),
    ("ComfyUI", re.compile(r"^diffusion_model\.(?P<m>.+)\.lora_(?P<s>A|B|up|down)\.weight$")),
    ("diffusers/PEFT", re.compile(r"^(?:transformer\.|base_model\.model\.)?(?P<m>.+)\.lora_(?P<s>A|B|up|down)\.weight$")),
]
FORMATS = ("diffusers/PEFT (transformer.<layer>.lora_A.weight), DiffSynth-Studio (<layer>.lora_A.default.weight), "
           "ComfyUI (diffusion_model.<layer>.lora_down.weight) or kohya (lora_unet_<layer>.lora_down.weight)")
_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.")
_ALPHA = re.compile(r"^(?:diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_|lora_transformer_)?"
                    r"(?P<m>.+)\.alpha$")


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
        raw = ck.metadata.get("lora_adapter_metadata")
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


class LoraTensors(Tensors):
    """LoRA tensors held in memory (a LoRA trained in the graph), with the metadata a file would carry."""

    def __init__(self, tensors: dict, metadata: dict | None = None):
        super().__init__(tensors, metadata=metadata)


def read_lora(path: str) -> LoraWeights:
    return parse_lora(open_checkpoint(path), os.path.basename(path))


def parse_lora(ck: CheckpointView, name: str) -> LoraWeights:
    """A LoRA from its tensors (a file opened by open_checkpoint, or LoraTensors): format detected from the keys,
    the scale of each layer from `.alpha` tensors or the PEFT settings in the metadata."""
    config = _AdapterConfig.of(ck, name)
    sides: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    fmt = None
    unknown = []
    te = next((k for k in ck if k.startswith(_TEXT_ENCODER)), None)
    if te:
        raise LetterpressError(
            f"LoRA {name} also changes a text encoder ({te}); Letterpress applies LoRAs to the DiT only, so it "
            "would not draw what the LoRA was trained to. Nothing was applied; use a DiT-only LoRA."
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


def for_dit(lora: LoraWeights, dit: ModelHandle) -> LoraWeights:
    """`lora` with its layers named as `dit`'s modules: kohya's flattened names matched to the DiT's layers, and a
    family's original checkpoint names (its SPEC.lora_plan, e.g. FLUX-style ones) converted. Names neither way are
    left as they are, for check_against to report."""
    from . import families

    plan_of = families.get(dit.family).lora_plan if dit.family in families.REGISTERED else None
    plan = plan_of(dit.module, set(lora.layers)) if plan_of else {}
    own = {n for n, m in dit.module.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    original = {s[: -len(".weight")] for sources, _ in plan.values() for s in sources if s.endswith(".weight")}
    layers = lora.layers
    if lora.format == "kohya":
        layers = _unflatten(layers, own | original)
    if any(m in original and m not in own for m in layers):
        layers = _through_plan(layers, plan, dit.module)
    return lora if layers is lora.layers else dataclasses.replace(lora, layers=layers)


def _unflatten(layers: dict, names: set[str]) -> dict:
    """kohya's `double_blocks_0_img_attn_qkv` -> `double_blocks.0.img_attn.qkv`, when exactly one of `names`
    flattens to it."""
    flat: dict[str, str | None] = {}
    for n in names:
        key = n.replace(".", "_")
        flat[key] = None if key in flat and flat[key] != n else n
    return {flat.get(m) or m: v for m, v in layers.items()}


def _through_plan(layers: dict, plan: dict, dit: torch.nn.Module) -> dict:
    """LoRA layers in a checkpoint's original names -> the DiT's modules, by the plan that converts that
    checkpoint's weights (DiT key -> (original keys, function)). Every such function builds a weight from rows of
    its sources (a slice, a reorder, a stack), and a LoRA's delta B @ A has the weight's rows in B: so the
    converted layer keeps A and gets the function applied to B. Stacked sources (a SwiGLU's up and gate
    halves) each keep their own ranks: A is theirs stacked, B block-diagonal (zeros for a source without a LoRA).
    Scales are folded into B."""
    converted = {s for sources, _ in plan.values() for s in sources}
    out = {m: v for m, v in layers.items() if m + ".weight" not in converted}
    for key, (sources, fn) in plan.items():
        modules = [src[: -len(".weight")] for src in sources if src.endswith(".weight")]
        hits = [m for m in modules if m in layers]
        if not key.endswith(".weight") or not hits:
            continue
        a = torch.cat([layers[m][0].float() for m in hits])
        rows = weight_shape(dit.get_submodule(key[: -len(".weight")]))[0]  # stacked sources split the rest evenly
        rows_missing = (rows - sum(layers[m][1].shape[0] for m in hits)) // max(1, len(modules) - len(hits))
        blocks, col = [], 0
        for m in modules:
            if m in layers:
                down, up, scale = layers[m]
                block = up.new_zeros((up.shape[0], a.shape[0]), dtype=torch.float32)
                block[:, col: col + down.shape[0]] = up.float() * scale
                col += down.shape[0]
            else:
                block = a.new_zeros((rows_missing, a.shape[0]))
            blocks.append(block)
        out[key[: -len(".weight")]] = (a, fn(*blocks), 1.0)
    return out


def check_against(lora: LoraWeights, dit: ModelHandle, what: str) -> None:
    """Refuse a LoRA whose target layers or shapes the DiT does not have, naming the mismatch."""
    modules = dict(dit.module.named_modules())
    missing = [m for m in lora.layers if m not in modules or not hasattr(modules[m], "weight")]
    if missing:
        found = len(lora.layers) - len(missing)
        kind = "another model family" if found == 0 else "a model with other layers"
        raise LetterpressError(
            f"LoRA {lora.name} was made for {kind}: the {what} has no {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(lora.layers)} targets missing)."
        )
    for m, (a, b, _) in lora.layers.items():
        shape = weight_shape(modules[m])
        if shape != (b.shape[0], a.shape[1]):
            raise LetterpressError(
                f"LoRA {lora.name} was made for another size: {m} is {shape} in the {what} "
                f"but the LoRA expects {(b.shape[0], a.shape[1])}."
            )
