"""ERNIE-Image / ERNIE-Image-Turbo checkpoints: DiT, Ministral-3 text encoder, prompt enhancer, Flux2 VAE.

Layouts: the Hugging Face diffusers folder (models/diffusers/ERNIE-Image[-Turbo]) and ComfyUI single
files (diffusion_models/ernie-image[-turbo].safetensors, text_encoders/ministral-3-3b.safetensors,
text_encoders/ernie-image-prompt-enhancer.safetensors, vae/flux2-vae.safetensors). Single files carry no
config: the architecture is read off tensor names and shapes.
"""

from __future__ import annotations

import os

from .errors import LetterpressError
from .explain import Source
from .families import FamilySpec, Signature
from .files import check_pipeline, component
from .handle import ModelHandle
from .llm import find_tokenizer_folders, in_diffusers_folders, llm_stage, load_tokenizer, read_generation_config
from .stage import Layout, Stage, config_file_or, load_stage, under
from .storage import Storage
from .vae import vae_stage
from .weights import Checkpoint, strip_prefix

FAMILY = "ernie_image"
PIPELINE_CLASSES = ("ErnieImagePipeline",)
MODEL, REPO = "an ERNIE-Image", "baidu/ERNIE-Image (or ERNIE-Image-Turbo)"

SPEC = FamilySpec(
    key=FAMILY, title="ERNIE-Image", class_stem="ErnieImage",
    sources=(
        Source("ERNIE-Image", FAMILY, "folder", "diffusers", "ERNIE-Image", "baidu/ERNIE-Image",
               pipeline="ErnieImagePipeline"),
        Source("ERNIE-Image-Turbo", FAMILY, "folder", "diffusers", "ERNIE-Image-Turbo", "baidu/ERNIE-Image-Turbo",
               pipeline="ErnieImagePipeline"),
        # single files as ComfyUI users have them: Comfy-Org's repackaged files, at the URLs ComfyUI's own templates
        # name (the ERNIE-Image templates of comfyui-workflow-templates)
        Source("ERNIE-Image-Turbo DiT", FAMILY, "dit", "diffusion_models", "ernie-image-turbo.safetensors",
               "Comfy-Org/ERNIE-Image", "diffusion_models/ernie-image-turbo.safetensors"),
        Source("ERNIE-Image-Turbo DiT (GGUF)", FAMILY, "dit", "diffusion_models", "ernie-image-turbo-Q4_K_M.gguf",
               "unsloth/ERNIE-Image-Turbo-GGUF", "ernie-image-turbo-Q4_K_M.gguf"),
        Source("ERNIE-Image DiT", FAMILY, "dit", "diffusion_models", "ernie-image.safetensors",
               "Comfy-Org/ERNIE-Image", "diffusion_models/ernie-image.safetensors"),
        Source("ERNIE-Image text encoder", FAMILY, "text_encoder", "text_encoders", "ministral-3-3b.safetensors",
               "Comfy-Org/ERNIE-Image", "text_encoders/ministral-3-3b.safetensors", companion=("tokenizer/*",)),
        Source("ERNIE-Image prompt enhancer", FAMILY, "prompt_enhancer", "text_encoders",
               "ernie-image-prompt-enhancer.safetensors", "Comfy-Org/ERNIE-Image",
               "text_encoders/ernie-image-prompt-enhancer.safetensors",
               companion=("pe_tokenizer/*", "pe/generation_config.json")),
        Source("Flux2 VAE", FAMILY, "vae", "vae", "flux2-vae.safetensors", "Comfy-Org/ERNIE-Image",
               "vae/flux2-vae.safetensors"),
    ),
    signatures=(Signature("dit", "ERNIE-Image DiT", ("x_embedder.proj.weight", "layers.0.adaLN_sa_ln.weight")),),
    components=("ministral3", "flux2_vae"),
    encode_node="ERNIE-Image Text Encode",
    latent_nodes="ERNIE-Image Empty Latent, DiT Sample or VAE Encode",
    # DiT activations per token of width (samplers/working_memory.py): 1.76 GB / (2 x 4608 x 4096 x 2 B) = 23.3
    dit_factor=29.0,
    tokenizer_folders=lambda role, path: tokenizer_folders(role, path),  # defined below
)

# Ministral-3 3B text settings that tensor shapes cannot tell (the rest is read off the shapes).
MINISTRAL3_TEMPLATE = dict(
    rms_norm_eps=1e-5,
    max_position_embeddings=262144,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=11,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "max_position_embeddings": 262144,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    },
)
# Flux2 VAE settings the shapes cannot tell.
FLUX2_VAE_TEMPLATE = dict(norm_num_groups=32, act_fn="silu", batch_norm_eps=1e-4, sample_size=1024)
TOKENIZER_HINT = (
    "A single-file text encoder needs the tokenizer of the ERNIE-Image repository: keep the diffusers folder "
    "models/diffusers/ERNIE-Image (its tokenizer/ and pe_tokenizer/ are found automatically), or copy that "
    "tokenizer folder next to the file as text_encoders/<file name without .safetensors>/."
)


def _component(path: str, sub: str) -> str:
    """`path` itself, or its `sub` folder when `path` is a whole ERNIE-Image folder."""
    if sub == "pe" and os.path.isdir(path) and not os.path.isdir(os.path.join(path, "pe")):
        raise LetterpressError(f"{path} has no prompt enhancer (pe/): this ERNIE-Image folder ships without one.")
    return component(path, sub, PIPELINE_CLASSES, MODEL, REPO)


# DiT -------------------------------------------------------------------------------------------


def dit_config_from_shapes(ck: Checkpoint, prefix: str) -> dict:
    s = lambda k: ck.shape(prefix + k)  # noqa: E731
    hidden, in_ch, p, _ = s("x_embedder.proj.weight")
    head_dim = s("layers.0.self_attention.norm_q.weight")[0] if prefix + "layers.0.self_attention.norm_q.weight" in ck else 128
    layers = {int(k[len(prefix) :].split(".")[1]) for k in ck if k.startswith(prefix + "layers.")}
    # Rotary axes: the real model splits its 128-wide heads 32/48/48; the same 1/4, 3/8, 3/8 split is used
    # for any head width.
    axes = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)
    return dict(
        hidden_size=hidden,
        num_attention_heads=hidden // head_dim,
        num_layers=len(layers),
        ffn_hidden_size=s("layers.0.mlp.gate_proj.weight")[0],
        in_channels=in_ch,
        out_channels=s("final_linear.weight")[0] // (p * p),
        patch_size=p,
        text_in_dim=s("text_proj.weight")[1] if prefix + "text_proj.weight" in ck else hidden,
        rope_theta=256,
        rope_axes_dim=axes,
        eps=1e-6,
        qk_layernorm=prefix + "layers.0.self_attention.norm_q.weight" in ck,
    )


def _dit_layout(ck: Checkpoint, path: str) -> Layout:
    prefix = strip_prefix(ck.keys(), "x_embedder.proj.weight")
    cfg, cfg_file = config_file_or(path, "ERNIE-Image DiT", lambda: dit_config_from_shapes(ck, prefix))
    return Layout(cfg, cfg_file, key_map=under(prefix))


def load_dit(path: str, storage: Storage) -> ModelHandle:
    from diffusers import ErnieImageTransformer2DModel

    path = _component(path, "transformer")
    what = "ERNIE-Image DiT"
    module = load_stage(path, storage, Stage(what, (FAMILY, what), "the ERNIE-Image DiT loader", _dit_layout,
                                             ErnieImageTransformer2DModel.from_config))
    turbo = "turbo" in os.path.basename(os.path.dirname(path) if os.path.isdir(path) else path).lower()
    return ModelHandle(FAMILY, "dit", module, source=path, turbo=turbo)


# Text encoder and prompt enhancer ----------------------------------------------------------------


# A single file's tokenizer in a diffusers folder of the model: its subfolder for each role (download.py fetches the
# same files, the Sources' companion, into '<stem>/' beside the file).
TOKENIZER_SUBFOLDERS = {"text_encoder": "tokenizer", "prompt_enhancer": "pe_tokenizer"}


def tokenizer_folders(role: str, path: str) -> list[str]:
    """Where the loader of a single `role` file at `path` looks for its tokenizer (SPEC.tokenizer_folders)."""
    return find_tokenizer_folders(path, in_diffusers_folders(PIPELINE_CLASSES, TOKENIZER_SUBFOLDERS[role]))


def _tokenizer_for(path: str, role: str, what: str):
    if os.path.isdir(path):  # a component folder of the diffusers layout: ../tokenizer
        sub = TOKENIZER_SUBFOLDERS[role]
        return load_tokenizer([os.path.join(os.path.dirname(path.rstrip(os.sep)), sub), path], what, TOKENIZER_HINT)
    return load_tokenizer(tokenizer_folders(role, path), what, TOKENIZER_HINT)


LLM = ("ministral3", "Ministral-3 language model")


def load_text_encoder(path: str, storage: Storage) -> ModelHandle:
    from transformers import Ministral3Config, Ministral3Model

    path = _component(path, "text_encoder")
    module = load_stage(path, storage, llm_stage("ERNIE-Image text encoder", LLM, "the ERNIE-Image text encoder loader",
                                                 Ministral3Config, Ministral3Model, MINISTRAL3_TEMPLATE, "text_config"))
    tokenizer = _tokenizer_for(path, "text_encoder", "ERNIE-Image text encoder")
    return ModelHandle("ernie_image", "text_encoder", module, tokenizer=tokenizer, source=path)


def load_prompt_enhancer(path: str, storage: Storage) -> ModelHandle:
    from transformers import Ministral3Config, Ministral3ForCausalLM

    path = _component(path, "pe")
    module = load_stage(path, storage, llm_stage("ERNIE-Image prompt enhancer", LLM,
                                                 "the ERNIE-Image prompt enhancer loader", Ministral3Config,
                                                 Ministral3ForCausalLM, MINISTRAL3_TEMPLATE, with_head=True))
    # a single file takes the sampling defaults of the release's pe/ folder, found as its tokenizer is
    folder = path if os.path.isdir(path) else None
    read_generation_config(module, [folder] if folder else find_tokenizer_folders(
        path, in_diffusers_folders(PIPELINE_CLASSES, "pe")), "ERNIE-Image prompt enhancer")
    tokenizer = _tokenizer_for(path, "prompt_enhancer", "ERNIE-Image prompt enhancer")
    return ModelHandle("ernie_image", "prompt_enhancer", module, tokenizer=tokenizer, source=path)


# VAE ---------------------------------------------------------------------------------------------


def load_flux2_vae(path: str, storage: Storage) -> ModelHandle:
    from diffusers import AutoencoderKLFlux2

    path = _component(path, "vae")
    module = load_stage(path, storage.unquantized(), vae_stage("Flux2 VAE", ("flux2_vae", "Flux2 VAE"),
                                                               "the ERNIE-Image VAE loader", AutoencoderKLFlux2,
                                                               FLUX2_VAE_TEMPLATE))
    return ModelHandle("ernie_image", "vae", module, source=path)


# Whole folder ------------------------------------------------------------------------------------


def load_folder(folder: str, storage: Storage, with_pe: bool = True) -> dict[str, ModelHandle | None]:
    check_pipeline(folder, PIPELINE_CLASSES, MODEL, REPO)
    out: dict[str, ModelHandle | None] = {
        "dit": load_dit(folder, storage),
        "text_encoder": load_text_encoder(folder, storage),
        "vae": load_flux2_vae(folder, storage),
        "prompt_enhancer": None,
    }
    if with_pe and os.path.isdir(os.path.join(folder, "pe")):
        out["prompt_enhancer"] = load_prompt_enhancer(folder, storage)
    return out
