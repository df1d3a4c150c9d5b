"""GLM-Image stages: AR prior tokens, glyph encoding, DiT sampling (with the reference-image KV cache), VAE.

Numerics follow diffusers' GlmImagePipeline (0.42.1) and transformers' GlmImageForConditionalGeneration:
- AR: the processor's chat template + target grid; `generate()` with the KV cache under a private RNG seeded
  with the seed (the pipeline seeds torch's global RNG with the generator's seed); for text-to-image the
  preview grid comes first and only the large d32 grid is kept, upsampled 2x (nearest) to H/16 x W/16.
- Reference images: ViT -> VQ tokens per image (transformers >= 5.18 returns per-image feature lists, which
  the pipeline wrongly concatenates; here each image is tokenized on its own), upsampled 2x; and VAE latents
  (distribution mode, normalised) written into the DiT's KV cache by one pass at t=0 with empty text.
- Glyphs: quoted spans ('..', “..”, "..", 「..」 in that order), ByT5-encoded, padding positions dropped.
- DiT: timesteps int(linspace(1000, 1, N+1)[:-1]); the DiT gets t - 1 unshifted; Euler uses sigmas t/1000
  with the dynamic shift mu = sqrt(seq/256) * 0.75 + 0.25; CFG as two passes, the unconditional one with the
  prior tokens dropped, the negative glyphs, and the KV cache skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle
from . import flow_match, flow_sampler, working_memory
from .flow_sampler import FlowModel
from .sizes import check_multiple
from .text_spans import quoted_spans
from .conditioning import Conditioning, check_family, check_latent
from .images import check_image, to_pil
from .generate import generate, sampling_args
from .numerics import warn_truncated
from .vae_codec import VaeCodec

FAMILY = "glm_image"
SCALE = 32  # AR tokens are d32
VAE_SCALE = 8


def check_size(width: int, height: int) -> None:
    check_multiple(width, height, SCALE, "GLM-Image", " (its AR tokens cover 32x32 pixels)")


@dataclass
class GlmPrior:
    """What the AR stage hands to the DiT: the target's prior tokens and, for editing, the references'."""

    tokens: torch.Tensor  # (1, H/16 * W/16) long, upsampled
    width: int
    height: int
    grid: tuple[int, int]  # d32 grid (h, w) the AR model generated
    generated: torch.Tensor  # every token generate() produced (preview grid included), for inspection
    reference_tokens: list[torch.Tensor] = field(default_factory=list)  # per image, 1-D, upsampled
    reference_grids: list[tuple[int, int]] = field(default_factory=list)  # per image, upsampled (h, w)
    reference_images: list[torch.Tensor] = field(default_factory=list)  # per image (1, H, W, 3), as resized
    prompt: str = ""
    seed: int = 0


def check_prior(prior) -> GlmPrior:
    if not isinstance(prior, GlmPrior):
        raise LetterpressError("The prior input is not GLM-Image prior tokens: wire it from GLM-Image AR Tokens.")
    return prior


# Reference images ----------------------------------------------------------------------------------


def _from_pil(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB")).astype(np.float32) / 255.0)[None]


def reference_size(processor, height: int, width: int) -> tuple[int, int]:
    """The pixel size a reference image is brought to, so that the AR processor's grid (which halves the
    image, then rounds to its patch factor) and the VAE latents (f8, DiT patch 2) cover the same cells."""
    from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize

    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    try:
        h, w = smart_resize(height, width, factor, lo, hi)
        target = (2 * h, 2 * w)
        again = smart_resize(*target, factor, lo, hi)
    except ValueError as e:
        raise LetterpressError(f"A reference image of {width}x{height} cannot be used: {e}.")
    if again != (h, w):
        raise LetterpressError(
            f"A reference image of {width}x{height} cannot be brought to a size the GLM-Image processor keeps "
            f"(limits {lo}..{hi} pixels); resize it to a multiple of {2 * factor} first."
        )
    return target


def prepare_references(processor, images: list[torch.Tensor]):
    """Each IMAGE frame (H, W, C) -> (the picture as it is, for the AR processor, which resizes it itself; the
    picture at the VAE's size as an IMAGE tensor). As the reference pipeline, each is resized once, from the
    original: the processor with its own filter, the VAE copy with Lanczos (diffusers' VaeImageProcessor)."""
    from PIL import Image

    out = []
    for img in images:
        pil = to_pil(img[None])[0]
        th, tw = reference_size(processor, pil.height, pil.width)
        vae_pil = pil if (th, tw) == (pil.height, pil.width) else pil.resize((tw, th), resample=Image.LANCZOS)
        out.append((pil, _from_pil(vae_pil)))
    return out


# AR stage ------------------------------------------------------------------------------------------


def _upsample(ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    ids = ids.view(1, 1, h, w)
    return torch.nn.functional.interpolate(ids.float(), scale_factor=2, mode="nearest").to(torch.long).view(1, -1)


@torch.no_grad()
def ar_tokens(ar: ModelHandle, prompt: str, width: int, height: int, seed: int, temperature: float, top_p: float,
              references: list[torch.Tensor] | None = None) -> GlmPrior:
    check_size(width, height)
    model, processor, device = ar.module, ar.tokenizer, ar.device
    refs = prepare_references(processor, references or [])
    content = [{"type": "image", "image": pil} for pil, _ in refs] + [{"type": "text", "text": prompt}]
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": content}]], tokenize=True,
        processor_kwargs={"target_h": height, "target_w": width}, return_dict=True, return_tensors="pt",
    ).to(device)
    grids = inputs["image_grid_thw"]
    n_refs = len(refs)
    if n_refs == 0:  # text-to-image: [large target, small preview]; the preview is generated first
        (_, gh, gw), preview = grids[0].tolist(), int(grids[1].prod())
        offset, max_new = preview, int(grids[:2, 1:].prod(-1).sum()) + 1
    else:  # image-to-image: [references..., target]
        _, gh, gw = grids[n_refs].tolist()
        offset, max_new = 0, gh * gw + 1

    ref_tokens, ref_grids = [], []
    if n_refs:
        source = grids[:n_refs]
        feats = model.get_image_features(inputs["pixel_values"], source).pooler_output  # one (C, h, w) per image
        ids = model.get_image_tokens(feats, source)
        for part, (_, h, w) in zip(torch.split(ids, source.prod(-1).tolist()), source.tolist()):
            ref_tokens.append(_upsample(part, h, w).squeeze(0).cpu())
            ref_grids.append((2 * h, 2 * w))

    out = generate(model, seed, max_new, **inputs, **sampling_args(temperature, top_p))
    new = out[0][inputs["input_ids"].shape[-1]:].cpu()
    large = new[offset: offset + gh * gw]
    if large.numel() != gh * gw:
        raise LetterpressError(
            f"The AR model stopped after {new.numel()} tokens, before finishing the {gh}x{gw} token grid. "
            "Try another seed, or check that the AR model is GLM-Image's."
        )
    codebook = model.config.vq_config.num_embeddings
    if int(large.max()) >= codebook:  # ids past the codebook are the AR's special tokens, sampled by chance
        raise LetterpressError(
            f"The AR model wrote a non-image token (id {int(large[large >= codebook][0])}, past its {codebook}-entry "
            f"codebook) inside the {gh}x{gw} token grid: sampling at temperature {temperature} / top_p {top_p} reached "
            "it. Lower the temperature or top_p (model card: 0.9 / 0.75), or try another seed."
        )
    return GlmPrior(tokens=_upsample(large, gh, gw), width=width, height=height, grid=(gh, gw), generated=new,
                    reference_tokens=ref_tokens, reference_grids=ref_grids,
                    reference_images=[img for _, img in refs], prompt=prompt, seed=seed)


def prior_preview(prior: GlmPrior) -> torch.Tensor:
    """The d32 token grid as an IMAGE at the target size: one colour per codebook entry (a fixed hash)."""
    prior = check_prior(prior)
    h2, w2 = prior.grid[0] * 2, prior.grid[1] * 2
    ids = prior.tokens.view(h2, w2)[::2, ::2].to(torch.int64)
    mix = (ids * 2654435761) % (2**32)
    rgb = torch.stack([(mix >> s) & 255 for s in (0, 8, 16)], dim=-1).float() / 255.0
    img = rgb.repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1)
    return img[None]


# Glyph encoder -------------------------------------------------------------------------------------


def glyph_spans(prompt: str) -> list[str]:
    """The quoted text the reference renders, in the reference's order (shared with the text check nodes)."""
    return quoted_spans(prompt)


@torch.no_grad()
def encode_glyphs(te: ModelHandle, prompt: str, max_sequence_length: int = 2048) -> Conditioning:
    tok, device = te.tokenizer, te.device
    spans = glyph_spans(prompt)
    texts = spans or [""]
    for span, n in zip(texts, (len(x) for x in tok(texts).input_ids)):
        warn_truncated(n, max_sequence_length, f"GLM-Image Glyph Encode, span {span[:20]!r}")
    ids = tok(texts, max_length=max_sequence_length, truncation=True).input_ids
    # The reference pads on the left by (number of spans + 1) % 2, for every span; kept as is.
    ids = [[tok.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]
    longest = max(len(x) for x in ids)
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids], device=device)
    input_ids = torch.tensor([x + [tok.pad_token_id] * (longest - len(x)) for x in ids], device=device)
    hidden = te.module(input_ids, attention_mask=mask).last_hidden_state
    embeds = hidden[mask.bool()]
    return Conditioning(FAMILY, te.describe(), [embeds.float().cpu()], prompt=prompt, extras={"spans": spans})


# DiT -----------------------------------------------------------------------------------------------


def _reference_latents(latent: dict | None, prior: GlmPrior, channels: int) -> list[torch.Tensor]:
    n = len(prior.reference_tokens)
    if latent is None:
        if n:
            raise LetterpressError(
                f"The prior was made with {n} reference image(s): wire their latents (GLM-Image VAE Encode with "
                "the prior) into reference_latents, so the DiT can read them."
            )
        return []
    samples = check_latent(latent, FAMILY, refuse_mask=True)
    refs = list(latent.get("references") or [s[None] for s in samples])
    if not n:
        raise LetterpressError("reference_latents are wired but the prior has no reference images: give the "
                               "reference images to AR Tokens too (or unwire reference_latents).")
    if len(refs) != n:
        raise LetterpressError(f"The prior was made with {n} reference image(s) but reference_latents hold {len(refs)}.")
    for ref in refs:
        if ref.dim() != 4 or ref.shape[:2] != (1, channels):
            raise LetterpressError(
                f"reference_latents hold a latent of shape {tuple(ref.shape)}; this DiT reads (1, {channels}, H, W): "
                "wire GLM-Image VAE Encode with the prior (not ComfyUI's own VAE Encode)."
            )
    return refs


def prepare_inputs(dit: ModelHandle, tokens: torch.Tensor, glyphs: torch.Tensor, height: int, width: int) -> dict:
    """The DiT's inputs besides x and the timestep, for images of height x width pixels: the prior tokens
    (B, seq), kept (the unconditional pass drops them: _uncond), the glyph embeddings (B, L, D), the size
    conditioning and the rotary embedding (it depends only on the latent grid: computed once, not at each pass);
    no KV cache (a sampler with reference images adds its own). Shared by sampling and LoRA training."""
    model, device, dtype = dit.module, dit.device, dit.dtype
    tokens = tokens.to(device)
    b, lh, lw = tokens.shape[0], height // VAE_SCALE, width // VAE_SCALE
    grid = torch.empty((1, model.config.in_channels, lh, lw), device="meta")  # rope reads only the grid size
    return {"encoder_hidden_states": glyphs.to(device, dtype), "prior_token_id": tokens,
            "prior_token_drop": torch.zeros_like(tokens, dtype=torch.bool),
            "target_size": torch.tensor([[height, width]] * b, dtype=dtype, device=device),
            "crop_coords": torch.zeros((b, 2), dtype=dtype, device=device), "kv_caches": None,
            "image_rotary_emb": tuple(r.to(device) for r in model.rope(grid))}


def velocity(run, x: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The DiT's velocity (in fp32, as the reference pipeline combines and steps it) at x and the schedule's integer
    timesteps t in 1000..1 (one per item; the DiT sees t - 1, unshifted, as the reference pipeline passes it); the
    one model call of sampling and LoRA training."""
    return run(hidden_states=x, timestep=t.to(x.device) - 1, **inputs, return_dict=False)[0].float()


def _uncond(inputs: dict) -> dict:
    """GLM-Image's unconditional pass: the prior tokens dropped and the reference images' KV cache skipped (no
    cache: diffusers' attention leaves keys and values alone without one, as in its "skip" mode)."""
    return {**inputs, "prior_token_drop": torch.ones_like(inputs["prior_token_drop"]), "kv_caches": None}


def schedule(dit: ModelHandle, steps: int, shape):
    """(sigmas with the terminal 0, timesteps int(linspace(1000, 1, N+1)[:-1])) for a (1, C, lh, lw) latent: the
    sigmas are t / 1000 shifted by the family's dynamic shift at the latent's token count."""
    sched = dit.scheduler
    lh, lw = shape[-2:]
    p = dit.module.config.patch_size
    n_train = sched.get("num_train_timesteps", 1000)
    ts = np.linspace(n_train, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    seq = lh * lw // p**2
    mu = math.sqrt(seq / sched.get("base_image_seq_len", 256)) * sched.get("max_shift", 0.75) + sched.get("base_shift", 0.25)
    if sched.get("use_dynamic_shifting", True):
        sigmas, _ = flow_match.schedule(ts / n_train, mu=mu, time_shift_type=sched.get("time_shift_type", "linear"))
    else:
        sigmas, _ = flow_match.schedule(ts / n_train, shift=sched.get("shift", 1.0))
    return sigmas, torch.from_numpy(ts)


def _inputs(dit: ModelHandle, conds: list, shape) -> dict:
    (tokens, glyphs), = conds  # one item per call: (its prior tokens, its glyph embeddings)
    return prepare_inputs(dit, tokens, glyphs[None], shape[-2] * VAE_SCALE, shape[-1] * VAE_SCALE)


def sequence(dit: ModelHandle, shape) -> tuple[int, int]:
    """The DiT's image tokens for a (1, C, lh, lw) latent (its patches) and its width."""
    cfgm = dit.module.config
    p = cfgm.patch_size
    return (shape[-2] // p) * (shape[-1] // p), cfgm.num_attention_heads * cfgm.attention_head_dim


# Sampling and LoRA training: each item conditioned on its AR prior tokens and its glyphs, one item per call (glyph
# sequences differ in length); CFG as two passes, the unconditional one without the prior tokens; training draws
# uniformly from the 1000-step schedule with plain MSE.
FLOW = FlowModel(FAMILY, inputs=_inputs, velocity=velocity, schedule=schedule, sequence=sequence, uncond=_uncond,
                 text_tokens=lambda cond: cond[1].shape[0], one_at_a_time=True)  # cond: (prior tokens, glyphs)
training_family = FLOW.training  # the training objective for lora_training.train: the sampler's FLOW


@torch.no_grad()
def image_prior_tokens(ar: ModelHandle, image: torch.Tensor) -> torch.Tensor:
    """The AR model's prior tokens of a picture (1, H, W, 3) at a size reference_size keeps: its vision encoder's
    VQ tokens (the d32 grid), upsampled 2x as the DiT reads them, (1, H/16 * W/16). What the DiT is conditioned on
    when it learns to draw that picture (the AR stage would have generated tokens like them)."""
    processor = ar.tokenizer
    out = processor.image_processor(images=to_pil(image[:1]), return_tensors="pt")
    grid = out["image_grid_thw"].to(ar.device)
    feats = ar.module.get_image_features(out["pixel_values"].to(ar.device, ar.dtype), grid).pooler_output
    ids = ar.module.get_image_tokens(feats, grid)
    _, gh, gw = grid[0].tolist()
    return _upsample(ids, gh, gw).cpu()


def encode_dataset(ar: ModelHandle, glyph: ModelHandle, vae: ModelHandle, dataset, resolution: int):
    """Each item's latents (at its resolution bucket, brought to a size the AR processor keeps), the AR prior tokens
    of the image and the glyph encoding of its caption's quoted text, computed once for a training run."""
    from ..loaders.host import get_host
    from .lora_training import bucket_size, resize

    host = get_host()
    sized = {}  # by image object: a variant sharing its item's image (caption dropped) is encoded once
    for img in dataset.images:
        w, h = bucket_size(img.shape[2], img.shape[1], resolution, SCALE)
        h, w = reference_size(ar.tokenizer, h, w)
        sized.setdefault(id(img), resize(img, w, h))
    latents = {}
    for key, img in sized.items():
        host.load(vae, memory_required=working_memory.vae(vae, 1, img.shape[1], img.shape[2]))
        latents[key] = encode(vae, img)["samples"].float()
    host.load(ar)
    tokens = {key: image_prior_tokens(ar, img) for key, img in sized.items()}
    host.load(glyph)
    cache: dict[str, torch.Tensor] = {}
    for c in dataset.captions:
        if c not in cache:
            cache[c] = encode_glyphs(glyph, c).embeds[0]
    return ([latents[id(img)] for img in dataset.images],
            [(tokens[id(img)], cache[c]) for img, c in zip(dataset.images, dataset.captions)])


def memory_required(dit: ModelHandle, prior, positive: Conditioning) -> int:
    """Bytes of activations of one DiT pass, plus the key/value cache the reference images fill (editing)."""
    prior = check_prior(prior)
    check_family(positive, FAMILY, "positive")
    cfgm = dit.module.config
    width = cfgm.num_attention_heads * cfgm.attention_head_dim
    glyphs = max((e.shape[0] for e in positive.embeds), default=0)
    kv = 2 * cfgm.num_layers * sum(gh * gw for gh, gw in prior.reference_grids) * width * dit.dtype.itemsize
    return working_memory.dit(dit, 1, prior.tokens.shape[-1] + glyphs, width) + kv


@torch.no_grad()
def sample(dit: ModelHandle, prior: GlmPrior, positive: Conditioning, negative: Conditioning | None, seed: int,
           steps: int, cfg: float, reference_latents: dict | None = None) -> dict:
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    prior = check_prior(prior)
    check_family(positive, FAMILY, "positive")
    use_cfg = flow_match.uses_cfg(cfg, negative, "wire a GLM-Image Glyph Encode of an empty prompt (the reference's negative)")
    if use_cfg:
        check_family(negative, FAMILY, "negative")
    flow_sampler.check_steps(steps)  # before the reference images' pass
    model, device, dtype = dit.module, dit.device, dit.dtype
    cfgm = model.config
    p = cfgm.patch_size
    height, width = prior.height, prior.width
    lh, lw = height // VAE_SCALE, width // VAE_SCALE
    if prior.tokens.shape[-1] != (lh // p) * (lw // p):
        raise LetterpressError(
            f"The prior holds {prior.tokens.shape[-1]} tokens but this DiT needs {(lh // p) * (lw // p)} for "
            f"{width}x{height}: the AR model and the DiT do not belong together."
        )
    if int(prior.tokens.max()) >= cfgm.prior_vq_quantizer_codebook_size:
        raise LetterpressError("The prior tokens exceed this DiT's codebook: the AR model and the DiT do not belong together.")
    refs = _reference_latents(reference_latents, prior, cfgm.in_channels)

    text_dim = cfgm.text_embed_dim
    kv = GlmImageKVCache(num_layers=cfgm.num_layers)
    if refs:
        kv.set_mode("write")
        for lat, ids, (gh, gw), img in zip(refs, prior.reference_tokens, prior.reference_grids, prior.reference_images):
            if lat.shape[-2] // p * (lat.shape[-1] // p) != ids.numel() or lat.shape[-2] // p != gh:
                raise LetterpressError(
                    f"A reference latent of {tuple(lat.shape[-2:])} does not match its {gh}x{gw} reference tokens: "
                    "encode the references with GLM-Image VAE Encode from the same prior."
                )
            ids = ids.to(device)
            model(hidden_states=lat.to(device, dtype), encoder_hidden_states=torch.zeros((1, 0, text_dim), device=device, dtype=dtype),
                  prior_token_id=ids, prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
                  timestep=torch.zeros((1,), device=device), target_size=torch.tensor([list(img.shape[1:3])], device=device),
                  crop_coords=torch.zeros((1, 2), device=device), kv_caches=kv)
        kv.next_sample()
        kv.set_mode("read")  # by the conditional pass only: the unconditional one goes without the cache (_uncond)

    pos = [(prior.tokens, positive.embeds[0])]
    neg = [(prior.tokens, negative.embeds[0])] if use_cfg else None
    try:
        out = flow_sampler.sample(FLOW, dit, pos, neg, cfg, seed, steps, shape=(1, cfgm.in_channels, lh, lw),
                                  extra_inputs={"kv_caches": kv if refs else None})
    finally:
        kv.clear()
    return {"samples": out, "family": FAMILY}


# VAE -----------------------------------------------------------------------------------------------


def _stats(vae: torch.nn.Module, like: torch.Tensor):
    c = vae.config.latent_channels
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1).to(like)
    std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1).to(like)
    return mean, std


def _to_vae(vae: torch.nn.Module, lat: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, lat)
    return lat * std + mean


def _from_vae(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return (z - mean) / std


VAE = VaeCodec(FAMILY, "GLM-Image VAE decode", _to_vae, _from_vae)  # its config's latents_mean and latents_std
decode = VAE.decode


def encode(vae: ModelHandle, image: torch.Tensor | None = None, prior: GlmPrior | None = None) -> dict:
    """IMAGE -> normalised latents; with a prior, its reference images (as AR Tokens resized them), one latent
    each, kept in order under "references" (they may differ in size)."""
    if prior is not None:
        prior = check_prior(prior)
        if not prior.reference_images:
            raise LetterpressError("This prior has no reference images: give reference images to GLM-Image AR Tokens.")
        refs = [VAE.latents(vae, img[..., :3]) for img in prior.reference_images]
        return {"samples": refs[0], "references": refs, "family": FAMILY}
    if image is None:
        raise LetterpressError("GLM-Image VAE Encode needs an image or a prior with reference images.")
    image = check_image(image, "GLM-Image VAE Encode")
    _, h, w, _ = image.shape
    step = VAE_SCALE * 2
    if h % step or w % step:
        raise LetterpressError(f"GLM-Image VAE Encode needs sizes that are multiples of {step}, got {w}x{h}. "
                               "For editing, wire the prior instead: it holds the references at the right size.")
    return VAE.encode(vae, image)
