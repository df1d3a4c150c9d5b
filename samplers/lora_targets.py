"""Which Linear layers of a DiT a LoRA trains: a choice among the blocks' layers (attention, MLP, all of them), or a
free list of target modules named as DiffSynth-Studio's `--lora_target_modules` and PEFT's `target_modules` name
them (a layer is trained when its name is an entry or ends with "." + an entry: `to_q,to_k,to_v,to_out.0`)."""

from __future__ import annotations

import torch

from ..loaders import layers as layer_kinds
from ..loaders.errors import LetterpressError

LAYER_CHOICES = ("attention", "mlp", "all")


def block_layers(module: torch.nn.Module) -> list[str]:
    """The Linear layers inside the DiT's blocks: the entries of the ModuleLists directly under it (`layers.N`,
    `transformer_blocks.N`, `single_transformer_blocks.N`); embedders, shared modulation and projectors outside the
    blocks are not among them."""
    lists = {name for name, child in module.named_children() if isinstance(child, torch.nn.ModuleList)}
    return [name for name, m in module.named_modules()
            if layer_kinds.kind_of(m) == "Linear" and name.split(".")[0] in lists and name.split(".")[1].isdigit()]


def _kind(name: str) -> str:
    parts = name.split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "ff", "ff_context") for p in parts) or parts[-1] == "proj_mlp":
        return "mlp"
    return "other"


def parse_modules(text: str) -> list[str]:
    """'to_q, to_k\\nto_out.0' -> ['to_q', 'to_k', 'to_out.0'] (commas or new lines between entries)."""
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


def matches(name: str, entry: str) -> bool:
    """PEFT's rule for a target_modules list: the full name, or its ending after a dot."""
    return name == entry or name.endswith("." + entry)


def target_layers(module: torch.nn.Module, which: str, modules: str = "") -> list[str]:
    """The layers a LoRA trains: those matching the `modules` list when one is given, else the blocks' attention
    projections, their MLPs, or all their Linear layers."""
    if modules.strip():
        return _listed(module, parse_modules(modules))
    if which not in LAYER_CHOICES:
        raise LetterpressError(f"layers must be one of {', '.join(LAYER_CHOICES)}, got {which!r}.")
    out = [n for n in block_layers(module) if which == "all" or _kind(n) == which]
    if not out:
        raise LetterpressError(f"This DiT has no {which} layers in its blocks to train.")
    return out


def _listed(module: torch.nn.Module, entries: list[str]) -> list[str]:
    linear = [n for n, m in module.named_modules() if layer_kinds.kind_of(m) == "Linear"]
    for entry in entries:
        if not any(matches(n, entry) for n in linear):
            endings = sorted({n.split(".", 2)[-1] for n in block_layers(module)})
            raise LetterpressError(f"target_modules: {entry!r} names no Linear layer of this DiT. Name layers as "
                                   f"PEFT does (the end of a layer's name after a dot); this DiT's blocks have "
                                   f"{', '.join(endings)}.")
    return [n for n in linear if any(matches(n, e) for e in entries)]


def lora_parameters(module: torch.nn.Module, targets: list[str], rank: int) -> int:
    """Trainable numbers of a rank-`rank` LoRA on `targets`: rank x (in + out) per layer."""
    total = 0
    for name in targets:
        out_f, in_f = layer_kinds.weight_shape(module.get_submodule(name))
        total += rank * (in_f + out_f)
    return total


def describe_choices(module: torch.nn.Module, rank: int, chosen: list[str]) -> dict:
    """Layers and LoRA parameters at `rank` for every choice and for the one made: what the node reports."""
    out = {}
    for which in LAYER_CHOICES:
        try:
            found = target_layers(module, which)
        except LetterpressError:
            found = []
        out[which] = {"layers": len(found), "parameters": lora_parameters(module, found, rank)}
    out["trained"] = {"layers": len(chosen), "parameters": lora_parameters(module, chosen, rank)}
    return out


def choices_line(counts: dict) -> str:
    """'training 8 layers, 4,096 parameters (attention 8 / 4,096; mlp 6 / ...; all 14 / ...)'."""
    t = counts["trained"]
    others = "; ".join(f"{w} {counts[w]['layers']} / {counts[w]['parameters']:,}" for w in LAYER_CHOICES)
    return f"training {t['layers']} layers, {t['parameters']:,} LoRA parameters (layers / parameters: {others})"
