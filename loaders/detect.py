"""Telling which model a checkpoint holds, from its tensor names alone."""

from __future__ import annotations

from typing import Iterable

from .errors import LetterpressError

# (family, role, human name) -> key fragments that must all appear in some key.
SIGNATURES: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("ernie_image", "dit", "ERNIE-Image DiT", ("x_embedder.proj.weight", "layers.0.adaLN_sa_ln.weight")),
    # Ovis-Image: the text-input RMSNorm and (original names) the SwiGLU double-block MLP tell it from FLUX.1.
    ("ovis_image", "dit", "Ovis-Image DiT", ("context_embedder_norm.weight", "single_transformer_blocks.0.")),
    ("ovis_image", "dit", "Ovis-Image DiT (original names)", ("double_blocks.0.", "single_blocks.0.", "img_mlp.gate_proj")),
    ("flux1", "dit", "FLUX.1 DiT", ("double_blocks.0.", "single_blocks.0.")),
    ("flux1", "dit", "FLUX.1 DiT", ("context_embedder.weight", "single_transformer_blocks.0.")),
    ("glm_image", "ar", "GLM-Image AR model", ("vqmodel.quantize.embedding.weight", "language_model.")),
    ("glm_image", "dit", "GLM-Image DiT", ("glyph_projector",)),
    ("glm_image", "dit", "GLM-Image DiT", ("prior_token_embedding",)),
    ("flux2_vae", "vae", "Flux2 VAE (ERNIE-Image)", ("bn.running_mean", "decoder.")),
    ("kl_vae", "vae", "16-channel KL VAE (FLUX.1 / GLM-Image / Ovis-Image)", ("decoder.", "encoder.")),
    ("qwen3", "text_encoder", "Qwen3 language model (Ovis-Image text encoder)", ("embed_tokens.weight", "self_attn.q_norm.weight")),
    ("ministral3", "text_encoder", "Ministral-3 language model (ERNIE-Image text encoder)", ("embed_tokens.weight", "layers.0.self_attn.o_proj")),
    ("t5", "text_encoder", "T5 / ByT5 encoder", ("encoder.block.0.",)),
]


class WrongModel(LetterpressError):
    """A checkpoint of another model than the one its loader needs (a single-file loader adds where to get it)."""


def describe(keys: Iterable[str]) -> tuple[str, str, str] | None:
    """(family, role, human name) of the first signature the keys match, or None."""
    keys = list(keys)
    for family, role, name, fragments in SIGNATURES:
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
