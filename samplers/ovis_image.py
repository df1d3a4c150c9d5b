"""Ovis-Image stages: text encoding (Ovis2.5 / Qwen3), MMDiT sampling, FLUX.1 VAE decode/encode.

Numerics follow diffusers' OvisImagePipeline:
- the prompt goes behind a fixed instruction prefix into the chat template (enable_thinking False), is padded to
  max_sequence_length + 28 tokens, encoded with the last hidden state, padded positions zeroed, and the first 28
  tokens (chat header and the start of the prefix) dropped;
- noise is drawn unpacked, (B, 16, H/8, W/8), from a CPU generator, then packed 2x2 into (B, H/16 * W/16, 64);
- sigmas linspace(1, 1/N, N) with FLUX's dynamic shift mu(image tokens); the DiT sees (sigma * 1000) / 1000;
- CFG as two passes, uncond + cfg * (cond - uncond);
- decode: unpack, latents / scaling_factor + shift_factor, VAE decode.

LATENT holds the unpacked, scaled latents (B, 16, H/8, W/8), ComfyUI's layout for 16-channel models.
"""

from __future__ import annotations

import torch

from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle
from ..loaders.ovis_image import DEFAULT_SCHEDULE
from . import flow_match, flow_sampler
from .conditioning import Conditioning, batch_for, check_latent
from .flow_sampler import FlowModel
from .images import check_image
from .numerics import warn_truncated
from .sizes import check_multiple
from .latents import pack_2x2_tokens, unpack_2x2_tokens
from .vae_codec import VaeCodec

FAMILY = "ovis_image"
NEGATIVE_HINT = "wire the negative output of Ovis-Image Text Encode"
MODEL = "Ovis-Image"
SCALE = 16  # VAE f8 x 2x2 packing
SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships of the "
    "objects and background: "
)
USER_PROMPT_BEGIN_ID = 28  # tokens of chat header + prefix that the reference drops
MAX_SEQUENCE_LENGTH = 256


def check_size(width: int, height: int) -> None:
    check_multiple(width, height, SCALE, MODEL)


# Text encoder --------------------------------------------------------------------------------------


def chat_text(tokenizer, prompt: str) -> str:
    message = [{"role": "user", "content": SYSTEM_PROMPT + prompt}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=False)


@torch.no_grad()
def encode_text(te: ModelHandle, prompt: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Conditioning:
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise LetterpressError(
            f"max_sequence_length must be between 1 and {MAX_SEQUENCE_LENGTH} (what Ovis-Image was trained with), "
            f"got {max_sequence_length}."
        )
    tok = te.tokenizer
    text = chat_text(tok, prompt)
    total = max_sequence_length + USER_PROMPT_BEGIN_ID
    tokens = tok([text], padding="max_length", truncation=True, max_length=total, return_tensors="pt",
                 add_special_tokens=False)
    ids = tokens.input_ids.to(te.device)
    mask = tokens.attention_mask.to(te.device)
    hidden = te.module(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = (hidden * mask[..., None])[:, USER_PROMPT_BEGIN_ID:]
    # Like the reference, a longer prompt is cut (the end of the chat template with it); record it for messages.
    n_tokens = len(tok(text, add_special_tokens=False).input_ids)
    warn_truncated(n_tokens, total, "Ovis-Image Text Encode (instruction prefix and chat template included)")
    truncated = n_tokens > total
    return Conditioning(FAMILY, te.describe(), [hidden[0].cpu()], prompt=prompt,
                        extras={"max_sequence_length": max_sequence_length, "truncated": truncated})


# DiT -----------------------------------------------------------------------------------------------


def text_ids(length: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(length, 3)
    ids[:, 1] = torch.arange(length)
    ids[:, 2] = torch.arange(length)
    return ids.to(device=device, dtype=dtype)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positions of the packed tokens; h, w are the packed grid sizes."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def _embeds(cond: Conditioning, batch: int, which: str, width: int) -> list[torch.Tensor]:
    per_image = batch_for(cond, batch, FAMILY, which)
    if len({e.shape for e in per_image}) != 1:
        raise LetterpressError(f"The {which} conditioning holds prompts encoded with different max_sequence_length.")
    got = per_image[0].shape[-1]
    if got != width:
        raise LetterpressError(
            f"The {which} conditioning is {got} wide but this Ovis-Image DiT takes {width}: the text encoder and the "
            "DiT are of different Ovis-Image sizes. Load both from the same release."
        )
    return per_image


def prepare_inputs(dit: ModelHandle, embeds: torch.Tensor, h: int, w: int) -> dict:
    """The DiT's inputs besides x and the timestep: text embeddings (B, L, D) and the text and image positions
    for an (h, w) unpacked latent. Shared by sampling and LoRA training."""
    device, dtype = dit.device, dit.dtype
    return {"encoder_hidden_states": embeds.to(device, dtype), "txt_ids": text_ids(embeds.shape[1], device, dtype),
            "img_ids": image_ids(h // 2, w // 2, device, dtype)}


def velocity(run, x: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The DiT's velocity at x (packed tokens) and the schedule's timesteps t = sigma * 1000 (one per item; the
    DiT sees t / 1000, as the reference pipeline passes it); the one model call of sampling and LoRA training."""
    return run(hidden_states=x, timestep=t.to(x.device).to(x.dtype) / 1000, **inputs, return_dict=False)[0]


def sequence(dit: ModelHandle, shape) -> tuple[int, int]:
    """The DiT's image tokens for a (B, 16, h, w) latent (2x2 packed) and its width."""
    cfgm = dit.module.config
    return (shape[-2] // 2) * (shape[-1] // 2), cfgm.num_attention_heads * cfgm.attention_head_dim


def schedule(dit: ModelHandle, steps: int, shape):
    """The reference schedule for a (B, 16, h, w) latent: linspace(1, 1/N, N) shifted dynamically by mu(its packed
    token count) (or statically, as the DiT's scheduler settings say)."""
    return flow_match.shifted_schedule(steps, dit.scheduler or DEFAULT_SCHEDULE, sequence(dit, shape)[0])


# Sampling and LoRA training: text embeddings per item, packed 2x2 tokens, CFG as two passes; training draws uniformly
# from the 1000-step schedule with plain MSE (as diffusers' FLUX-family LoRA scripts train by default).
FLOW = FlowModel(FAMILY, inputs=lambda dit, conds, shape: prepare_inputs(dit, torch.stack(conds), *shape[-2:]),
                 velocity=velocity, schedule=schedule, sequence=sequence, to_model=pack_2x2_tokens,
                 from_model=lambda x, shape: unpack_2x2_tokens(x, *shape[-2:]))


training_family = FLOW.training  # the training objective for lora_training.train: the sampler's FLOW


def encode_dataset(te: ModelHandle, vae: ModelHandle, dataset, resolution: int,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """Each item's latents (at its resolution bucket) and text encoding, computed once for a training run."""
    from .lora_training import encode_items

    return encode_items(vae, te, dataset, resolution, SCALE, lambda v, img: encode(v, img)["samples"].float(),
                        lambda t, c: encode_text(t, c, max_sequence_length).embeds[0])


def memory_required(dit: ModelHandle, positive: Conditioning, negative: Conditioning | None, latent: dict,
                    cfg: float) -> int:
    """Bytes of activations of one DiT pass (the cond and uncond passes run one after the other)."""
    samples = check_latent(latent, FAMILY)
    if samples.dim() != 4:
        return 0  # sample() names the problem
    b = samples.shape[0]
    conds = {"positive": positive}
    if flow_match.uses_cfg(cfg, negative, NEGATIVE_HINT):
        conds["negative"] = negative
    text = max(e.shape[0] for which, c in conds.items() for e in batch_for(c, b, FAMILY, which))
    return FLOW.memory(dit, b, samples.shape, text)


def sample(dit: ModelHandle, positive: Conditioning, negative: Conditioning | None, latent: dict, seed: int,
           steps: int, cfg: float, denoise: float = 1.0) -> dict:
    model = dit.module
    init = check_latent(latent, FAMILY)
    if init.dim() != 4:
        raise LetterpressError(f"The latent has shape {tuple(init.shape)}; Ovis-Image needs (batch, 16, H/8, W/8).")
    b, c, h, w = init.shape
    if c * 4 != model.config.in_channels:
        raise LetterpressError(
            f"The latent has {c} channels; this Ovis-Image DiT needs {model.config.in_channels // 4}. "
            "Use an Ovis-Image Empty Latent or VAE Encode."
        )
    if h % 2 or w % 2:
        raise LetterpressError(f"The latent is {w}x{h}; Ovis-Image needs even latent sizes (images in multiples of 16).")
    use_cfg = flow_match.uses_cfg(cfg, negative, NEGATIVE_HINT)
    width = model.config.joint_attention_dim
    pos = _embeds(positive, b, "positive", width)
    neg = _embeds(negative, b, "negative", width) if use_cfg else None
    out = flow_sampler.sample(FLOW, dit, pos, neg, cfg, seed, steps, init=init, denoise=denoise,
                              noise_mask=latent.get("noise_mask"))
    return {"samples": out, "family": FAMILY}


# VAE -----------------------------------------------------------------------------------------------


VAE = VaeCodec(FAMILY, "FLUX.1 VAE decode")  # the FLUX.1 VAE's scaling_factor and shift_factor
decode = VAE.decode  # unpacked, scaled latents -> IMAGE (B, H, W, C) in 0..1


def encode(vae: ModelHandle, image: torch.Tensor) -> dict:
    """IMAGE (B, H, W, C) -> unpacked, scaled latents (the distribution's mode), for denoise < 1."""
    image = check_image(image, "Ovis-Image VAE Encode")
    _, h, w, _ = image.shape
    check_multiple(w, h, 2 * 2 ** (len(vae.module.config.block_out_channels) - 1), MODEL)
    return VAE.encode(vae, image)


def empty_latent(width: int, height: int, batch: int, channels: int = 16) -> dict:
    check_size(width, height)
    if batch < 1:
        raise LetterpressError(f"batch must be at least 1, got {batch}.")
    return {"samples": torch.zeros(batch, channels, height // 8, width // 8), "family": FAMILY}
