"""Live previews for hosts that show them (ComfyUI): a cheap image of the sampler's current x0 estimate."""

from __future__ import annotations

import torch


def latent_rgb_preview(latent: torch.Tensor, size: int = 256):
    """(B, C, H, W) latent -> a PIL image of the first sample: channel thirds averaged into R, G, B,
    each stretched to its 1st-99th percentile. It shows composition and contrast as they form, not
    true colours (no VAE runs during sampling)."""
    from PIL import Image

    x = latent[0].detach().float().cpu()
    groups = torch.stack([g.mean(0) for g in x.chunk(3, dim=0)])
    flat = groups.flatten(1)
    lo, hi = flat.quantile(0.01, dim=1)[:, None, None], flat.quantile(0.99, dim=1)[:, None, None]
    rgb = ((groups - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    arr = (rgb.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    scale = max(1, size // max(img.size))
    return img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
