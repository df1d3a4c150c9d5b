"""LATENT <-> IMAGE through a family's diffusers VAE: the one decode and encode, each family giving how its LATENT
relates to the VAE's own latents (`VaeCodec`).

Decode: the latent checked (its family, its channels), brought to the VAE's device and dtype, turned into the VAE's
latents (`to_vae`), laid out for the VAE (latents.vae_layout), decoded, checked finite, made an IMAGE. Encode: the
IMAGE (checked by the family's node) to -1..1, encoded, the distribution's mode turned into the LATENT
(`from_vae`), on the CPU. The default pair is the KL VAEs' (FLUX.1-style) scaling: LATENT = (z - shift_factor) *
scaling_factor, from the VAE's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..loaders.handle import ModelHandle
from .conditioning import check_latent
from .images import vae_input, vae_output
from .latents import vae_layout
from .numerics import check_finite


def unscale(vae: torch.nn.Module, lat: torch.Tensor) -> torch.Tensor:
    """A scaled LATENT -> the KL VAE's latents: lat / scaling_factor + shift_factor (its config's)."""
    return lat / vae.config.scaling_factor + vae.config.shift_factor


def scale(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The KL VAE's latents -> a scaled LATENT: (z - shift_factor) * scaling_factor."""
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@dataclass(frozen=True)
class VaeCodec:
    """A family's VAE side: `to_vae(module, lat)` / `from_vae(module, z)` between its LATENT and the VAE's latents
    (the KL scaling by default), `what` the decode's name in messages ("FLUX.1 VAE decode"), and `per_channel` the
    LATENT's channels per VAE latent channel (4 for a 2x2-patchified LATENT)."""

    family: str
    what: str
    to_vae: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = unscale
    from_vae: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = scale
    per_channel: int = 1

    @torch.no_grad()
    def decode(self, vae: ModelHandle, latent: dict) -> torch.Tensor:
        """A LATENT of this family -> IMAGE (B, H, W, 3) in 0..1 on the CPU."""
        lat = check_latent(latent, self.family, self.per_channel * vae.module.config.latent_channels)
        z = vae_layout(self.to_vae(vae.module, lat.to(vae.device, vae.dtype)))
        return vae_output(check_finite(vae.module.decode(z, return_dict=False)[0], self.what, vae.dtype))

    @torch.no_grad()
    def latents(self, vae: ModelHandle, image: torch.Tensor) -> torch.Tensor:
        """A checked RGB IMAGE (B, H, W, 3) -> this family's latents (the distribution's mode), on the CPU."""
        z = vae.module.encode(vae_input(image, vae.device, vae.dtype)).latent_dist.mode()
        return self.from_vae(vae.module, z).cpu()

    def encode(self, vae: ModelHandle, image: torch.Tensor) -> dict:
        """A checked RGB IMAGE -> this family's LATENT."""
        return {"samples": self.latents(vae, image), "family": self.family}
