"""GLM-Image checkpoints: the AR model (vision-language encoder + processor), the ByT5 glyph encoder, the DiT and
the 16-channel KL VAE.

GLM-Image ships in the Hugging Face diffusers layout only (zai-org/GLM-Image -> models/diffusers/GLM-Image:
vision_language_encoder/, processor/, text_encoder/, tokenizer/, transformer/, vae/, scheduler/). Every loader
takes that folder (or the component folder itself) and builds its module on the meta device, then fills it
tensor by tensor from the memory-mapped safetensors.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from .errors import LetterpressError
from .explain import Source
from .families import FamilySpec, Signature
from .files import check_pipeline, component, scheduler_settings
from .handle import ModelHandle
from .host import get_host
from .llm import TOKENIZER_FILES, read_generation_config, read_tokenizer
from .stage import Layout, Stage, config_file_or, load_stage
from .storage import Storage
from .vae import vae_stage
from .weights import Checkpoint, read_json

FAMILY = "glm_image"
PIPELINE_CLASSES = ("GlmImagePipeline",)
MODEL, REPO = "a GLM-Image", "zai-org/GLM-Image"

SPEC = FamilySpec(
    key=FAMILY, title="GLM-Image", class_stem="GlmImage",
    sources=(Source("GLM-Image", FAMILY, "folder", "diffusers", "GLM-Image", "zai-org/GLM-Image",
                    pipeline="GlmImagePipeline"),),
    signatures=(Signature("ar", "GLM-Image AR model", ("vqmodel.quantize.embedding.weight", "language_model.")),
                Signature("dit", "GLM-Image DiT", ("glyph_projector",)),
                Signature("dit", "GLM-Image DiT", ("prior_token_embedding",))),
    components=("t5", "kl_vae"),
    encode_node="GLM-Image Glyph Encode",
    latent_nodes="GLM-Image VAE Encode or DiT Sample",
    # DiT activations per token of width (samplers/working_memory.py): 0.51 GB / (4160 x 4096 x 2 B) = 15.0
    dit_factor=19.0,
)
# The reference scheduler settings (GlmImagePipeline: dynamic shift from base 0.25 / max 0.75 over 256 tokens).
DEFAULT_SCHEDULER = dict(num_train_timesteps=1000, base_image_seq_len=256, base_shift=0.25, max_shift=0.75,
                         use_dynamic_shifting=True, time_shift_type="linear", shift=1.0)
KL_VAE_TEMPLATE = dict(norm_num_groups=32, act_fn="silu", sample_size=1024)


def _component(path: str, sub: str, what: str) -> str:
    """`path/sub` when `path` is the whole GLM-Image folder, else `path` (a component folder)."""
    path = component(path, sub, PIPELINE_CLASSES, MODEL, REPO)
    if not os.path.isdir(path):
        raise LetterpressError(
            f"{what}: {path} does not exist. GLM-Image is published in the diffusers layout only: download "
            f"{REPO} into models/diffusers/GLM-Image (it must hold {sub}/)."
        )
    return path


def _sibling(path: str, sub: str) -> str:
    return os.path.join(os.path.dirname(path.rstrip(os.sep)), sub)


def _config_file(what: str):
    """A Stage's `read`: the component folder's config.json (GLM-Image ships no single files)."""
    return lambda ck, path: Layout(*config_file_or(path, what))


# AR model ------------------------------------------------------------------------------------------


_AR_DROPPED = ("architectures", "model_type", "transformers_version", "dtype")


def load_ar(path: str, storage: Storage) -> ModelHandle:
    """GlmImageForConditionalGeneration (+ its GlmImageProcessor and generation config)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor

    what = "GLM-Image AR model"
    path = _component(path, "vision_language_encoder", what)

    def read(ck: Checkpoint, path: str) -> Layout:
        cfg_file = os.path.join(path, "config.json")
        return Layout({k: v for k, v in read_json(cfg_file, what).items() if k not in _AR_DROPPED}, cfg_file)

    def build(cfg: dict) -> torch.nn.Module:
        return get_host().model_class(GlmImageForConditionalGeneration)(GlmImageConfig(**cfg))

    module = load_stage(path, storage, Stage(what, (FAMILY, what), "the GLM-Image AR loader", read, build))
    read_generation_config(module, [path], what)
    proc_dir = next((p for p in (_sibling(path, "processor"), path)
                     if os.path.exists(os.path.join(p, "processor_config.json"))
                     or os.path.exists(os.path.join(p, "preprocessor_config.json"))), None)
    if proc_dir is None:
        raise LetterpressError(f"{what}: no processor found next to {path} (the GLM-Image folder needs processor/).")
    processor = read_tokenizer(GlmImageProcessor.from_pretrained, proc_dir, what,
                               TOKENIZER_FILES + ("processor_config.json",), "processor")
    return ModelHandle(FAMILY, "ar", module, tokenizer=processor, source=path)


# Glyph encoder (ByT5) ------------------------------------------------------------------------------


def load_glyph_encoder(path: str, storage: Storage) -> ModelHandle:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    what = "GLM-Image glyph encoder (ByT5)"
    path = _component(path, "text_encoder", what)
    # T5 casts its activations to its weights' dtype, which fp8 cannot compute in; and ByT5 is small (0.2B), so fp8
    # storage would save little: bf16 instead. A GGUF type (Q8_0, ...) is not applied for the same reason (packed
    # weights are uint8): ByT5 loads in the compute dtype those choices give.
    storage = replace(storage, quant=None, dtype=torch.bfloat16 if storage.dtype.itemsize == 1 else storage.dtype)

    def read(ck: Checkpoint, path: str) -> Layout:
        cfg, cfg_file = config_file_or(path, what)
        return Layout(cfg, cfg_file, key_map=lambda k: None if k.startswith("decoder.") or k == "lm_head.weight" else k)

    def tie(module: torch.nn.Module) -> None:
        module.encoder.embed_tokens = module.shared  # tied, as T5EncoderModel ties them

    module = load_stage(path, storage, Stage(what, ("t5", "T5 / ByT5 encoder"), "the GLM-Image glyph encoder loader",
                                             read, lambda cfg: T5EncoderModel(T5Config(**cfg)),
                                             optional=("encoder.embed_tokens.",), finish=tie))
    tok_dir = next((p for p in (_sibling(path, "tokenizer"), path)
                    if os.path.exists(os.path.join(p, "tokenizer_config.json"))), None)
    tokenizer = read_tokenizer(ByT5Tokenizer.from_pretrained, tok_dir, what, ("tokenizer_config.json",)) if tok_dir \
        else ByT5Tokenizer()
    return ModelHandle(FAMILY, "glyph_encoder", module, tokenizer=tokenizer, source=path)


# DiT -----------------------------------------------------------------------------------------------


def load_dit(path: str, storage: Storage) -> ModelHandle:
    from diffusers import GlmImageTransformer2DModel

    what = "GLM-Image DiT"
    path = _component(path, "transformer", what)
    module = load_stage(path, storage, Stage(what, (FAMILY, what), "the GLM-Image DiT loader", _config_file(what),
                                             GlmImageTransformer2DModel.from_config))
    return ModelHandle(FAMILY, "dit", module, source=path,
                       scheduler=scheduler_settings(path, DEFAULT_SCHEDULER, "GLM-Image scheduler"))


# VAE -----------------------------------------------------------------------------------------------


def load_kl_vae(path: str, storage: Storage) -> ModelHandle:
    from diffusers import AutoencoderKL

    what = "GLM-Image VAE"
    path = _component(path, "vae", what)
    module = load_stage(path, storage.unquantized(), vae_stage(what, ("kl_vae", "16-channel KL VAE"),
                                                               "the GLM-Image VAE loader", AutoencoderKL,
                                                               KL_VAE_TEMPLATE))
    c = module.config
    if c.latents_mean is None or c.latents_std is None:
        raise LetterpressError(f"{what}: {path}/config.json has no latents_mean / latents_std; it is not GLM-Image's VAE.")
    for key in ("latents_mean", "latents_std"):
        values = c[key]
        if not isinstance(values, (list, tuple)) or len(values) != c.latent_channels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise LetterpressError(
                f"{os.path.join(path, 'config.json')}: {key} must list one number per latent channel "
                f"({c.latent_channels}), not {values!r}. The file is damaged or was edited: download it again."
            )
    return ModelHandle(FAMILY, "vae", module, source=path)


# Whole folder --------------------------------------------------------------------------------------


def load_folder(folder: str, storage: Storage) -> dict[str, ModelHandle]:
    check_pipeline(folder, PIPELINE_CLASSES, MODEL, REPO)
    return {
        "ar": load_ar(folder, storage),
        "glyph_encoder": load_glyph_encoder(folder, storage),
        "dit": load_dit(folder, storage),
        "vae": load_kl_vae(folder, storage),
    }
