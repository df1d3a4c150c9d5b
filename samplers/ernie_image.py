"""ERNIE-Image stages: prompt enhancement, text encoding, DiT sampling, Flux2 VAE decode/encode.

Numerics follow diffusers' ErnieImagePipeline: penultimate hidden state per prompt, zero-padded with
true lengths; noise drawn in patchified space (B, 128, H/16, W/16); sigmas linspace(1, 0, N+1)[:-1]
with a static shift; the DiT sees sigma * 1000; CFG batched as [uncond, cond].
"""

from __future__ import annotations

import json

import torch

from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle
from . import flow_match, flow_sampler
from .conditioning import Conditioning, batch_for, check_latent
from .flow_sampler import BATCHED, FlowModel
from .generate import generate, sampling_args
from .images import check_image
from .latents import patchify_2x2, unpatchify_2x2
from .numerics import log, warn_truncated
from .sizes import check_multiple
from .vae_codec import VaeCodec

FAMILY = "ernie_image"
SCALE = 16  # VAE f8 x 2x2 patchify
NEGATIVE_HINT = "wire a Text Encode (an empty prompt is fine)"


def check_size(width: int, height: int) -> None:
    check_multiple(width, height, SCALE, "ERNIE-Image")


# Prompt enhancer ---------------------------------------------------------------------------------


@torch.no_grad()
def enhance_prompt(pe: ModelHandle, prompt: str, width: int, height: int, seed: int, temperature: float,
                   top_p: float, max_new_tokens: int) -> str:
    tok = pe.tokenizer
    user = json.dumps({"prompt": prompt, "width": width, "height": height}, ensure_ascii=False)
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=False)
    inputs = tok(text, return_tensors="pt").to(pe.device)
    out = generate(
        pe.module, seed, max_new_tokens, **inputs, **sampling_args(temperature, top_p),
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# Text encoder ------------------------------------------------------------------------------------


@torch.no_grad()
def encode_text(te: ModelHandle, prompt: str) -> Conditioning:
    tok = te.tokenizer
    full = len(tok(prompt, add_special_tokens=True, truncation=False, padding=False)["input_ids"])
    warn_truncated(full, tok.model_max_length, "ERNIE-Image Text Encode")
    ids = tok(prompt, add_special_tokens=True, truncation=True, padding=False)["input_ids"]
    if not ids:
        ids = [tok.bos_token_id if tok.bos_token_id is not None else 0]
    out = te.module(input_ids=torch.tensor([ids], device=te.device), output_hidden_states=True)
    hidden = out.hidden_states[-2][0]
    return Conditioning(FAMILY, te.describe(), [hidden.float().cpu()], prompt=prompt)


# DiT ---------------------------------------------------------------------------------------------


def prepare_inputs(dit: ModelHandle, hiddens: list[torch.Tensor]) -> dict:
    """The DiT's inputs besides x and the timestep, for one text encoding per batch item (zero-padded with true
    lengths, as the reference pipeline batches them). Shared by sampling and LoRA training."""
    device, dtype = dit.device, dit.dtype
    lens = torch.tensor([h.shape[0] for h in hiddens], device=device, dtype=torch.long)
    text = torch.zeros((len(hiddens), int(lens.max()), dit.module.config.text_in_dim), device=device, dtype=dtype)
    for i, h in enumerate(hiddens):
        text[i, : h.shape[0]] = h.to(device, dtype)
    return {"text_bth": text, "text_lens": lens}


def velocity(run, x: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The DiT's velocity at x (patchified latents) and the schedule's timesteps t = sigma * 1000 (one per item);
    the one model call of sampling and of LoRA training."""
    return run(hidden_states=x, timestep=t.to(x.device, x.dtype), **inputs, return_dict=False)[0]


def schedule(dit: ModelHandle, steps: int, shape, shift: float):
    """sigmas linspace(1, 0, N+1)[:-1] with a static shift; at 1000 steps, the schedule DiffSynth-Studio trains with."""
    return flow_match.schedule(torch.linspace(1.0, 0.0, steps + 1)[:-1].numpy(), shift=shift)


def training_weight(timesteps: torch.Tensor) -> torch.Tensor:
    """The loss weight of each training timestep as DiffSynth-Studio (ERNIE-Image's trainer) weighs it: a bell
    exp(-2 ((t - 500) / 1000)^2) less its minimum, normalised to mean 1 over the 1000 timesteps."""
    y = torch.exp(-2 * ((timesteps.double() - 500) / 1000) ** 2)
    y = y - y.min()
    return (y * (len(timesteps) / y.sum())).float()


def sequence(dit: ModelHandle, shape) -> tuple[int, int]:
    """The DiT's image tokens for a patchified (B, 128, h, w) latent (one per position) and its width."""
    return shape[-2] * shape[-1], dit.module.config.hidden_size


def _mask(noise_mask, shape, device):
    """The mask on the VAE's f8 grid, patchified as the latents are: 8-px cells."""
    b, c, h, w = shape
    return patchify_2x2(flow_match.inpaint_mask(noise_mask, (b, c // 4, 2 * h, 2 * w), device))


FLOW = FlowModel(FAMILY, inputs=lambda dit, conds, shape: prepare_inputs(dit, conds),
                 velocity=velocity, schedule=schedule, sequence=sequence, cfg=BATCHED, mask=_mask,
                 loss_weight=training_weight)


def training_family(shift: float):
    """ERNIE-Image's training objective for lora_training.train: the sampler's FLOW at this shift."""
    return FLOW.training(shift=shift)


def encode_dataset(te: ModelHandle, vae: ModelHandle, dataset, resolution: int):
    """Each item's latents (at its resolution bucket) and text encoding, computed once for a training run."""
    from .lora_training import encode_items

    return encode_items(vae, te, dataset, resolution, SCALE, lambda v, img: encode(v, img)["samples"].float(),
                        lambda t, c: encode_text(t, c).embeds[0])


def memory_required(dit: ModelHandle, positive: Conditioning, negative: Conditioning | None, latent: dict,
                    cfg: float) -> int:
    """Bytes of activations of one DiT step (the uncond and cond passes batched), for the host to make room."""
    shape = check_latent(latent, FAMILY, dit.module.config.in_channels).shape
    conds = {"positive": positive}
    if flow_match.uses_cfg(cfg, negative, NEGATIVE_HINT):
        conds["negative"] = negative
    text = max(e.shape[0] for which, c in conds.items() for e in batch_for(c, shape[0], FAMILY, which))
    return FLOW.memory(dit, shape[0] * len(conds), shape, text)


def sample(dit: ModelHandle, positive: Conditioning, negative: Conditioning | None, latent: dict, seed: int,
           steps: int, cfg: float, shift: float, denoise: float = 1.0) -> dict:
    if dit.turbo and (cfg > 1.0 or steps > 16):
        log.warning("ERNIE-Image-Turbo is distilled for 8 steps at cfg 1.0; %d steps at cfg %.1f will be slower "
                    "and usually worse. Use the Turbo preset (8 steps, cfg 1.0).", steps, cfg)
    init = check_latent(latent, FAMILY, dit.module.config.in_channels)
    b = init.shape[0]
    use_cfg = flow_match.uses_cfg(cfg, negative, NEGATIVE_HINT)
    pos = batch_for(positive, b, FAMILY, "positive")
    neg = batch_for(negative, b, FAMILY, "negative") if use_cfg else None
    out = flow_sampler.sample(FLOW, dit, pos, neg, cfg, seed, steps, init=init, denoise=denoise,
                              noise_mask=latent.get("noise_mask"), shift=shift)
    return {"samples": out, "family": FAMILY}


# VAE ---------------------------------------------------------------------------------------------


def _bn_stats(vae: torch.nn.Module, like: torch.Tensor):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-5).to(like)
    return mean, std


def _to_vae(vae: torch.nn.Module, lat: torch.Tensor) -> torch.Tensor:
    """Patchified, normalised latents -> the Flux2 VAE's: its batch-norm statistics undone, unpatchified."""
    mean, std = _bn_stats(vae, lat)
    return unpatchify_2x2(lat * std + mean)


def _from_vae(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    lat = patchify_2x2(z)
    mean, std = _bn_stats(vae, lat)
    return (lat - mean) / std


VAE = VaeCodec(FAMILY, "Flux2 VAE decode", _to_vae, _from_vae, per_channel=4)
decode = VAE.decode  # patchified, normalised latents -> IMAGE (B, H, W, C) in 0..1


def encode(vae: ModelHandle, image: torch.Tensor) -> dict:
    """IMAGE (B, H, W, C) -> patchified, normalised latents (the distribution's mode)."""
    image = check_image(image, "ERNIE-Image VAE Encode")
    check_size(image.shape[2], image.shape[1])
    return VAE.encode(vae, image)


def empty_latent(width: int, height: int, batch: int, channels: int = 128) -> dict:
    check_size(width, height)
    if batch < 1:
        raise LetterpressError(f"batch must be at least 1, got {batch}.")
    return {"samples": torch.zeros(batch, channels, height // SCALE, width // SCALE), "family": FAMILY}
