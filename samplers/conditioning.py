"""Text conditioning as it travels between nodes: the family and encoder that made it, so a sampler
of another family can refuse it with a clear message instead of failing inside a matmul."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..loaders import families
from ..loaders.errors import LetterpressError



def _encode_node(family: str) -> str:
    """The node that makes `family`'s conditioning, as the editor shows it (its SPEC.encode_node)."""
    return (families.get(family).encode_node or family) if family in families.REGISTERED else family


def _latent_nodes(family: str) -> str:
    return (families.get(family).latent_nodes or family) if family in families.REGISTERED else family


@dataclass
class Conditioning:
    family: str
    encoder: str  # which text encoder made it, for messages
    embeds: list[torch.Tensor]  # one (tokens, dim) tensor per prompt
    prompt: str = ""
    extras: dict = field(default_factory=dict)  # family-specific (masks, pooled vectors, glyph spans)


def check_family(cond: Conditioning, family: str, which: str) -> None:
    if not isinstance(cond, Conditioning):
        raise LetterpressError(
            f"The {which} input is not Letterpress conditioning: wire it from a {_encode_node(family)} node."
        )
    if cond.family != family:
        raise LetterpressError(
            f"The {which} conditioning came from the {families.title(cond.family)} text encoder "
            f"({cond.encoder}); the {families.title(family)} sampler needs conditioning from a "
            f"{_encode_node(family)} node."
        )


def batch_for(cond: Conditioning, batch: int, family: str, which: str) -> list[torch.Tensor]:
    """The per-image embeddings for a latent batch: each prompt repeated batch/len(prompts) times."""
    check_family(cond, family, which)
    n = len(cond.embeds)
    if batch % n:
        raise LetterpressError(f"The {which} conditioning holds {n} prompts, which does not divide the batch of {batch}.")
    return [e for e in cond.embeds for _ in range(batch // n)]


def check_latent(latent: dict, family: str, channels: int | None = None, refuse_mask: bool = False) -> torch.Tensor:
    """The latent's samples, after checking it belongs to this family, holds at least one image, (given
    `channels`) its shape, and (`refuse_mask`) that it carries no inpainting mask the node would ignore."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise LetterpressError("The latent input is not a LATENT.")
    name, sources = families.title(family), _latent_nodes(family)
    got = latent.get("family")
    if got is not None and got != family:
        raise LetterpressError(
            f"This latent was made for {families.title(got)}; {name} nodes need one from a {sources} node."
        )
    samples = latent["samples"]
    if channels is not None and (samples.dim() != 4 or samples.shape[1] != channels):
        raise LetterpressError(
            f"The latent has shape {tuple(samples.shape)}; {name} needs (batch, {channels}, H, W) latents: use a "
            f"{sources} node (not ComfyUI's own Empty Latent Image or VAE Encode)."
        )
    if samples.dim() == 0 or samples.shape[0] < 1:
        raise LetterpressError(f"The latent holds no image (shape {tuple(samples.shape)}); use a batch size of 1 or more.")
    if refuse_mask and latent.get("noise_mask") is not None:
        raise LetterpressError(
            f"These latents carry a noise mask (Set Latent Noise Mask), which {name} does not use here. Remove the "
            "mask node."
        )
    return samples
