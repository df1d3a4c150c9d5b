"""Telling which model a checkpoint holds, from its tensor names alone."""

from __future__ import annotations

from typing import Iterable

from . import families
from .errors import LetterpressError

# Architectures several models share, under neutral ids (a family's SPEC.components names those its stages use),
# in detection order: each after the more specific ones it would also match (a Qwen3 checkpoint has the key
# fragments of Ministral-3; a Flux2 VAE those of the KL VAE). A family's own signatures (its SPEC.signatures) are
# tried before all of these. (id, role, human name, key fragments that must all appear in some key, users named
# besides the registered families that use it)
COMPONENTS: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("flux1", "dit", "FLUX.1 DiT", ("double_blocks.0.", "single_blocks.0."), ()),
    ("flux1", "dit", "FLUX.1 DiT", ("context_embedder.weight", "single_transformer_blocks.0."), ()),
    ("flux2_vae", "vae", "Flux2 VAE", ("bn.running_mean", "decoder."), ()),
    ("kl_vae", "vae", "16-channel KL VAE", ("decoder.", "encoder."), ("FLUX.1",)),
    ("qwen3", "text_encoder", "Qwen3 language model", ("embed_tokens.weight", "self_attn.q_norm.weight"), ()),
    ("ministral3", "text_encoder", "Ministral-3 language model", ("embed_tokens.weight", "layers.0.self_attn.o_proj"), ()),
    ("t5", "text_encoder", "T5 / ByT5 encoder", ("encoder.block.0.",), ()),
]


def component_users(component: str, role: str) -> list[str]:
    """Who uses a shared architecture, as a message names them ('<title>', or '<title> text encoder' for a text encoder)."""
    word = " text encoder" if role == "text_encoder" else ""
    return [spec.title + word for spec in families.all() if component in spec.components]


def signatures() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(family or component id, role, human name, key fragments), in detection order: the registered families'
    own architectures, then the shared ones named with the families that use them ('Flux2 VAE (<family title>)')."""
    found = [(spec.key, s.role, s.name, s.fragments) for spec in families.all() for s in spec.signatures]
    for cid, role, name, fragments, also in COMPONENTS:
        users = [*also, *component_users(cid, role)]
        found.append((cid, role, f"{name} ({' / '.join(users)})" if users else name, fragments))
    return found


class WrongModel(LetterpressError):
    """A checkpoint of another model than the one its loader needs (a single-file loader adds where to get it)."""


def describe(keys: Iterable[str]) -> tuple[str, str, str] | None:
    """(family, role, human name) of the first signature the keys match, or None."""
    keys = list(keys)
    for family, role, name, fragments in signatures():
        if all(any(f in k for k in keys) for f in fragments):
            return family, role, name
    return None


def expect(keys: Iterable[str], family: str, wanted: str, source: str, loader: str) -> None:
    """Raise a clear error when the keys are not those of `family`."""
    keys = list(keys)
    found = describe(keys)
    if found and found[0] == family:
        return
    what = f"a {found[2]}" if found else "no model this loader knows"
    raise WrongModel(
        f"{source} holds {what}, not {wanted}. Pick a {wanted} file in {loader}, "
        "or use the loader of the model family this file belongs to."
    )
