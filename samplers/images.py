"""IMAGE inputs as ComfyUI passes them: (batch, height, width, channels) floats in 0..1. One check for every
node that reads one, so a grey or transparent picture works and a malformed tensor gets a clear error."""

from __future__ import annotations

import torch

from ..loaders.errors import LetterpressError


def check_image(image, what: str) -> torch.Tensor:
    """`image` as RGB (B, H, W, 3): grey (1 channel) is repeated, alpha (4th channel) dropped."""
    if not isinstance(image, torch.Tensor):
        raise LetterpressError(f"{what}: the image input is not an IMAGE; wire it from Load Image or a decoder.")
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:3]) < 1:
        raise LetterpressError(
            f"{what}: an IMAGE is (batch >= 1, height, width, 1, 3 or 4 channels); this one has shape "
            f"{tuple(image.shape)}. Wire it from Load Image or a VAE Decode node."
        )
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def vae_input(image: torch.Tensor, device, dtype) -> torch.Tensor:
    """A checked RGB IMAGE (B, H, W, 3) in 0..1 -> what the VAEs encode: (B, 3, H, W) in -1..1."""
    return image.permute(0, 3, 1, 2).to(device, dtype) * 2 - 1


def vae_output(decoded: torch.Tensor) -> torch.Tensor:
    """What the VAEs decode, (B, 3, H, W) in -1..1 -> an IMAGE (B, H, W, 3) in 0..1 on the CPU."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    """ComfyUI IMAGE (B, H, W, C floats 0..1) -> RGB PIL images (rounded, so 8-bit inputs survive exactly)."""
    import numpy as np
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        raise LetterpressError("The image input must be a ComfyUI IMAGE (batch, height, width, channels).")
    out = []
    for img in images:
        arr = (img.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        out.append(Image.fromarray(arr[..., :3]))
    return out
