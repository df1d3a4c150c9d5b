"""The flow-matching numerics the one sampler (flow_sampler) is built of: sigma schedules (static or dynamic
shift), the start point for denoise < 1, inpainting masks, classifier-free guidance and the Euler loop with
progress, previews and Cancel.

The numerics follow diffusers' FlowMatchEulerDiscreteScheduler (float32 sigmas, float32 Euler update).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..loaders.errors import LetterpressError

from ..loaders.host import get_host
from .numerics import check_seed


def static_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(sigmas: np.ndarray, mu: float, exponent: float = 1.0) -> np.ndarray:
    """FLUX's resolution-dependent shift (diffusers' `time_shift` with the exponential type)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** exponent)


def linear_shift(sigmas: np.ndarray, mu: float, exponent: float = 1.0) -> np.ndarray:
    """diffusers' `time_shift` with the linear type (CogView4-style scheduler configs)."""
    return mu / (mu + (1 / sigmas - 1) ** exponent)


def calculate_mu(seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """The linear mu of FLUX-style pipelines for an image of `seq_len` latent tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def schedule(base_sigmas, shift: float | None = None, mu: float | None = None, num_train_timesteps: int = 1000,
             time_shift_type: str = "exponential"):
    """(sigmas with the terminal 0 appended, timesteps = sigma * 1000) as float32 tensors."""
    s = np.array(base_sigmas).astype(np.float32)
    if mu is not None:
        s = linear_shift(s, mu) if time_shift_type == "linear" else dynamic_shift(s, mu)
    elif shift is not None:
        s = static_shift(s, shift)
    sigmas = torch.from_numpy(np.asarray(s)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def shifted_schedule(steps: int, settings: dict, image_tokens: int):
    """The schedule of FLUX-style pipelines (diffusers' FlowMatchEulerDiscreteScheduler as they set it): sigmas
    linspace(1, 1/N, N), shifted by mu(`image_tokens`) when the scheduler settings (scheduler_config.json's keys)
    say use_dynamic_shifting, else by their static `shift`."""
    base = np.linspace(1.0, 1 / steps, steps)
    if settings.get("use_dynamic_shifting", True):
        return schedule(base, mu=calculate_mu(image_tokens, settings["base_image_seq_len"],
                                              settings["max_image_seq_len"], settings["base_shift"],
                                              settings["max_shift"]))
    return schedule(base, shift=settings["shift"])


def start_index(steps: int, denoise: float) -> int:
    """First step to run for a partial denoise (diffusers' img2img strength convention)."""
    if not 0.0 < denoise <= 1.0:
        raise LetterpressError(f"denoise must be in (0, 1], got {denoise}. Use 1.0 for text-to-image.")
    first = int(max(steps - min(steps * denoise, steps), 0))  # diffusers' get_timesteps, rounding included
    if first >= steps:
        raise LetterpressError(f"denoise {denoise} with {steps} steps runs no step; raise steps or denoise.")
    return first


def noise_like(shape, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The reference's noise: one CPU generator seeded with the node's seed, drawn in the model dtype."""
    check_seed(seed)
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)


def start_latents(noise: torch.Tensor, init: torch.Tensor | None, sigma0: float) -> torch.Tensor:
    """Noise for a full run; the image latents noised to sigma0 for a partial one."""
    if init is None or sigma0 >= 1.0:
        return noise
    return sigma0 * noise + (1.0 - sigma0) * init.to(noise)


def inpaint_mask(noise_mask: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    """ComfyUI's noise mask (Set Latent Noise Mask: 1 redraws, 0 keeps; pixel-sized, (B?, H, W)) on a latent grid
    of `shape` (B, C, h, w): resized bilinearly and repeated to the batch, as ComfyUI's own samplers do."""
    if not isinstance(noise_mask, torch.Tensor) or noise_mask.dim() < 2 or noise_mask.numel() == 0:
        raise LetterpressError("The latent's noise_mask is not a MASK; wire it from Set Latent Noise Mask.")
    b, c, h, w = shape
    m = noise_mask.float().reshape(-1, 1, *noise_mask.shape[-2:])
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear").clamp(0, 1)
    m = m.repeat(-(-b // m.shape[0]), c, 1, 1)[:b]
    return m.to(device)


def keep_unmasked(mask: torch.Tensor, init: torch.Tensor, noise: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """For inpainting: after each step, where `mask` is 0 the latent is the input latent noised to the new sigma,
    so only the masked area is redrawn and the rest ends as the input (diffusers' FLUX inpainting; ComfyUI's
    samplers do the same). All three are in the layout of the loop's x. The last blend (sigma 0) stays float32,
    so the kept area is the input exactly even when the DiT runs in bf16."""
    noise, init = noise.float(), init.float()

    def blend(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = mask * x.float() + (1 - mask) * (sigma * noise + (1 - sigma) * init)
        return out if float(sigma) == 0.0 else out.to(x.dtype)
    return blend


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def uses_cfg(cfg: float, negative, wire_hint: str) -> bool:
    """Whether this cfg runs the negative pass; a clear error for a non-finite cfg or a missing negative."""
    if not math.isfinite(cfg):
        raise LetterpressError(f"cfg must be a finite number, got {cfg}.")
    if cfg > 1.0 and negative is None:
        raise LetterpressError(f"cfg > 1 needs a negative conditioning: {wire_hint}.")
    return cfg > 1.0


def euler_loop(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    first: int = 0,
    preview: Callable[[torch.Tensor], object] | None = None,
    blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run steps first..N-1: x <- x + (sigma[i+1] - sigma[i]) * v, one progress tick each, Cancel-checked;
    `blend(x, sigma)` (inpainting, see keep_unmasked) after each step."""
    host = get_host()
    n = len(sigmas) - 1
    bar = host.progress(n - first)
    try:
        for i in range(first, n):
            host.check_interrupt()
            v = predict(x, i)
            dt = sigmas[i + 1] - sigmas[i]
            x_next = (x.to(torch.float32) + dt * v).to(v.dtype)
            if blend is not None:
                x_next = blend(x_next, sigmas[i + 1])
            image = None
            if preview is not None and host.previews_enabled():
                image = preview(x.to(torch.float32) - sigmas[i] * v.to(torch.float32))  # the x0 estimate
            x = x_next
            bar.update(1, image)
    finally:
        bar.close()
    host.check_interrupt()
    return x
