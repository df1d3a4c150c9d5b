"""Ovis-Image checkpoints: the MMDiT, the Ovis2.5 text encoder (a Qwen3 LM) and the FLUX.1 VAE.

Layouts:
- the Hugging Face diffusers folder (AIDC-AI/Ovis-Image-7B -> models/diffusers/Ovis-Image-7B);
- the original single file `ovis_image.safetensors` (FLUX-style names: `double_blocks.N.img_attn.qkv`,
  `single_blocks.N.linear1`, `semantic_txt_in`, SwiGLU `img_mlp.gate_proj/up_proj/down_proj`), converted on load;
- ComfyUI files: `diffusion_models/ovis_image_bf16.safetensors` (the same original names, optionally under
  `model.diffusion_model.`, with ComfyUI's `txt_norm` / `txt_in` spelling accepted too),
  `text_encoders/ovis_2.5.safetensors` (Qwen3 LM weights under any wrapper prefix) and the FLUX.1
  `vae/ae.safetensors` (original VAE names, converted by diffusers' own convert_ldm_vae_checkpoint).

Single files carry no config: the architecture is read off tensor names and shapes.

diffusers has no converter for the original Ovis-Image names, and its FLUX.1 one
(convert_flux_transformer_checkpoint_to_diffusers) cannot be called for them: it hard-codes a 3072 width and a
4x GELU MLP and requires the pooled `vector_in` embedder Ovis does not have. So the conversion lives here: a
rename plus the fused-qkv split, the SwiGLU [up; gate] stacking and FLUX's shift/scale swap of the final
modulation, applied lazily one tensor at a time.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .checkpoint import CheckpointView, DerivedView
from .errors import LetterpressError
from .explain import Source
from .families import FamilySpec, Signature
from .files import check_pipeline, component, scheduler_settings
from .handle import ModelHandle
from .packed import cat_rows, split_rows
from .llm import find_tokenizer_folders, in_diffusers_folders, llm_stage, load_tokenizer
from .stage import Layout, Stage, config_file_or, load_stage, under
from .storage import Storage
from .vae import vae_stage
from .weights import Checkpoint, strip_prefix

FAMILY = "ovis_image"
PIPELINE_CLASSES = ("OvisImagePipeline",)
MODEL, REPO = "an Ovis-Image", "AIDC-AI/Ovis-Image-7B"

SPEC = FamilySpec(
    key=FAMILY, title="Ovis-Image", class_stem="OvisImage",
    sources=(
        Source("Ovis-Image", FAMILY, "folder", "diffusers", "Ovis-Image-7B", "AIDC-AI/Ovis-Image-7B",
               pipeline="OvisImagePipeline"),
        # single files at the URLs of docs.comfy.org's Ovis-Image page
        Source("Ovis-Image DiT", FAMILY, "dit", "diffusion_models", "ovis_image_bf16.safetensors",
               "Comfy-Org/Ovis-Image", "split_files/diffusion_models/ovis_image_bf16.safetensors"),
        Source("Ovis-Image text encoder", FAMILY, "text_encoder", "text_encoders", "ovis_2.5.safetensors",
               "Comfy-Org/Ovis-Image", "split_files/text_encoders/ovis_2.5.safetensors", companion=("tokenizer/*",)),
        Source("FLUX.1 VAE", FAMILY, "vae", "vae", "ae.safetensors", "Comfy-Org/z_image_turbo",
               "split_files/vae/ae.safetensors"),
    ),
    # the text-input RMSNorm and (original names) the SwiGLU double-block MLP tell it from FLUX.1
    signatures=(Signature("dit", "Ovis-Image DiT", ("context_embedder_norm.weight", "single_transformer_blocks.0.")),
                Signature("dit", "Ovis-Image DiT (original names)",
                          ("double_blocks.0.", "single_blocks.0.", "img_mlp.gate_proj"))),
    components=("qwen3", "kl_vae"),
    encode_node="Ovis-Image Text Encode",
    latent_nodes="Ovis-Image Empty Latent, DiT Sample or VAE Encode",
    # DiT activations per token of width (samplers/working_memory.py): 0.68 GB / (4380 x 3072 x 2 B) = 25.3
    dit_factor=32.0,
    # LoRAs in the original (FLUX-style) names are converted by the plan of the checkpoint conversion
    lora_plan=lambda module, names: lora_plan(module, names),  # defined below
    tokenizer_folders=lambda role, path: tokenizer_folders(role, path),  # defined below
)

# Qwen3 settings of the Ovis2.5-2B language model that tensor shapes cannot tell (Qwen3-1.7B base).
QWEN3_TEMPLATE = dict(
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# FLUX.1 VAE settings the shapes cannot tell (ae.safetensors has no config).
FLUX1_VAE_TEMPLATE = dict(
    norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    force_upcast=True,
)
# The reference scheduler: FLUX's resolution-dependent (dynamic) shift.
DEFAULT_SCHEDULE = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                        base_shift=0.5, max_shift=1.15, shift=3.0)
TOKENIZER_HINT = (
    "A single-file Ovis-Image text encoder needs the Ovis-Image tokenizer (Qwen2): keep the diffusers folder "
    "models/diffusers/Ovis-Image-7B (its tokenizer/ is found automatically), or copy that tokenizer folder next to "
    "the file as text_encoders/<file name without .safetensors>/."
)
LATENT_CHANNELS = 16


def _component(path: str, sub: str) -> str:
    """`path` itself, or its `sub` folder when `path` is a whole Ovis-Image folder."""
    return component(path, sub, PIPELINE_CLASSES, MODEL, REPO)


# DiT: original (FLUX-style) names -> diffusers names ------------------------------------------------


class _Converted(DerivedView):
    """A lazy state dict in diffusers names over a checkpoint in original names (one tensor at a time; GGUF-packed
    rows pass through the row functions packed)."""

    def __init__(self, ck: CheckpointView, plan: dict[str, tuple[tuple[str, ...], Callable]]):
        super().__init__(ck)
        self.plan = plan

    def base_key(self, key: str) -> str:
        return self.plan[key][0][0]

    def __getitem__(self, key: str) -> torch.Tensor:
        sources, fn = self.plan[key]
        return fn(*[self.base[s] for s in sources])

    def names(self):
        return self.plan.keys()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# Row functions: they take plain tensors or GGUF-packed ones (whose rows are whole blocks, so rows move packed).


def _rows(a: int, b: int) -> Callable:
    return lambda t: split_rows(t, (a, b))


def _swap_halves(t):
    """FLUX's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)."""
    half = t.shape[0] // 2
    return cat_rows([split_rows(t, (half, t.shape[0])), split_rows(t, (0, half))])


def _stack(*ts):
    return cat_rows(list(ts))


def original_plan(keys: set[str], shape: Callable[[str], tuple]) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """diffusers key -> (original keys, function building it) for an Ovis-Image DiT in original names.

    `keys` are the original names without any wrapper prefix. Both spellings of the text input are accepted:
    `semantic_txt_norm` / `semantic_txt_in` (AIDC's release) and `txt_norm` / `txt_in` (ComfyUI's FLUX class).
    QK-norm scales may be called `.weight` (AIDC, nn.RMSNorm) or `.scale` (BFL's FLUX convention).
    """

    def spelling(base: str, *suffixes: str) -> str:
        return next((f"{base}.{x}" for x in suffixes if f"{base}.{x}" in keys), f"{base}.{suffixes[0]}")

    txt = "semantic_txt" if "semantic_txt_norm.weight" in keys else "txt"
    qk_scale = spelling("double_blocks.0.img_attn.norm.query_norm", "weight", "scale").rsplit(".", 1)[1]
    blocks = lambda kind: sorted({int(k.split(".")[1]) for k in keys if k.startswith(kind)})  # noqa: E731
    singles = blocks("single_blocks.")
    plan = _plan(shape("img_in.weight")[0], shape(f"single_blocks.{singles[0]}.linear1.weight")[0] if singles else 0,
                 blocks("double_blocks."), singles, txt, spelling(f"{txt}_norm", "weight", "scale"), qk_scale)
    missing = sorted({s for sources, _ in plan.values() for s in sources if s not in keys})
    if missing:
        raise LetterpressError(f"Ovis-Image DiT: the file lacks {', '.join(missing[:3])}"
                               f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; it is not a whole "
                               "Ovis-Image DiT.")
    return plan


def _plan(h: int, linear1_rows: int, doubles: list[int], singles: list[int], txt: str, txt_norm: str,
          qk_scale: str) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """The plan for a DiT `h` wide with these blocks; `txt` is the text input's spelling (`semantic_txt` or
    `txt`), `txt_norm` its norm's key, `qk_scale` the name of the QK-norm scales ("weight" or "scale")."""

    def norm(base: str) -> str:
        return f"{base}.{qk_scale}"

    plan: dict[str, tuple[tuple[str, ...], Callable]] = {}

    def same(new: str, old: str) -> None:
        plan[new] = ((old,), _same)

    for wb in ("weight", "bias"):
        same(f"x_embedder.{wb}", f"img_in.{wb}")
        same(f"timestep_embedder.linear_1.{wb}", f"time_in.in_layer.{wb}")
        same(f"timestep_embedder.linear_2.{wb}", f"time_in.out_layer.{wb}")
        same(f"context_embedder.{wb}", f"{txt}_in.{wb}")
        same(f"proj_out.{wb}", f"final_layer.linear.{wb}")
        plan[f"norm_out.linear.{wb}"] = ((f"final_layer.adaLN_modulation.1.{wb}",), _swap_halves)
    same("context_embedder_norm.weight", txt_norm)

    for i in doubles:
        o, n = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for side, mod, attn_names, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), "ff"),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context"),
        ):
            for wb in ("weight", "bias"):
                same(f"{n}{mod}.linear.{wb}", f"{o}{side}_mod.lin.{wb}")
                for j, name in enumerate(attn_names):
                    plan[f"{n}attn.{name}.{wb}"] = ((f"{o}{side}_attn.qkv.{wb}",), _rows(j * h, (j + 1) * h))
                out = "to_out.0" if side == "img" else "to_add_out"
                same(f"{n}attn.{out}.{wb}", f"{o}{side}_attn.proj.{wb}")
                # diffusers' SwiGLU computes proj(x) = [up; gate] and returns up * silu(gate).
                plan[f"{n}{ff}.net.0.proj.{wb}"] = ((f"{o}{side}_mlp.up_proj.{wb}", f"{o}{side}_mlp.gate_proj.{wb}"), _stack)
                same(f"{n}{ff}.net.2.{wb}", f"{o}{side}_mlp.down_proj.{wb}")
            q, k = ("norm_q", "norm_k") if side == "img" else ("norm_added_q", "norm_added_k")
            same(f"{n}attn.{q}.weight", norm(f"{o}{side}_attn.norm.query_norm"))
            same(f"{n}attn.{k}.weight", norm(f"{o}{side}_attn.norm.key_norm"))
    for i in singles:
        o, n = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for wb in ("weight", "bias"):
            same(f"{n}norm.linear.{wb}", f"{o}modulation.lin.{wb}")
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                plan[f"{n}attn.{name}.{wb}"] = ((f"{o}linear1.{wb}",), _rows(j * h, (j + 1) * h))
            # linear1 = [q; k; v; mlp; mlp_gate]; diffusers' proj_mlp splits [states; gate] the same way.
            plan[f"{n}proj_mlp.{wb}"] = ((f"{o}linear1.{wb}",), _rows(3 * h, linear1_rows))
            same(f"{n}proj_out.{wb}", f"{o}linear2.{wb}")
        same(f"{n}attn.norm_q.weight", norm(f"{o}norm.query_norm"))
        same(f"{n}attn.norm_k.weight", norm(f"{o}norm.key_norm"))
    return plan


def lora_plan(dit: torch.nn.Module, names: set[str]) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """The conversion plan for the loaded (diffusers) DiT `dit`, to read a LoRA whose layers carry the original
    names (`names`: ComfyUI's and the original file's spelling, `double_blocks.N.img_attn.qkv`, ...)."""
    h = dit.config.num_attention_heads * dit.config.attention_head_dim
    singles = list(range(len(dit.single_transformer_blocks)))
    rows = 3 * h + dit.single_transformer_blocks[0].proj_mlp.out_features if singles else 0
    txt = "txt" if any(n.startswith("txt_") for n in names) else "semantic_txt"
    return _plan(h, rows, list(range(len(dit.transformer_blocks))), singles, txt, f"{txt}_norm.weight", "weight")


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The real model splits its 128-wide heads 16/56/56 (1/8, 7/16, 7/16); the same split for any width."""
    if head_dim == 128:
        return (16, 56, 56)
    a = head_dim // 8
    b = (head_dim - a) // 2
    axes = (a, b, head_dim - a - b)
    if any(x % 2 for x in axes):
        raise LetterpressError(f"Ovis-Image DiT: cannot split {head_dim}-wide attention heads into rotary axes.")
    return axes


def dit_config(
    inner: int, in_ch: int, out_ch: int, head_dim: int, joint: int, ff_rows: int, n_double: int, n_single: int
) -> dict:
    if ff_rows != 8 * inner:
        raise LetterpressError(
            f"Ovis-Image DiT: its MLP is {ff_rows // 2} wide for a {inner}-wide model; Ovis-Image (and diffusers' "
            "OvisImageTransformer2DModel) uses 4x. The file is another model."
        )
    return dict(
        patch_size=1, in_channels=in_ch, out_channels=out_ch, num_layers=n_double, num_single_layers=n_single,
        attention_head_dim=head_dim, num_attention_heads=inner // head_dim, joint_attention_dim=joint,
        axes_dims_rope=_rope_axes(head_dim),
    )


def _config_from_diffusers_names(shape: Callable[[str], tuple], keys: set[str]) -> dict:
    inner, in_ch = shape("x_embedder.weight")
    return dit_config(
        inner, in_ch, shape("proj_out.weight")[0], shape("transformer_blocks.0.attn.norm_q.weight")[0],
        shape("context_embedder.weight")[1], shape("transformer_blocks.0.ff.net.0.proj.weight")[0],
        len({k.split(".")[1] for k in keys if k.startswith("transformer_blocks.")}),
        len({k.split(".")[1] for k in keys if k.startswith("single_transformer_blocks.")}),
    )


def _config_from_original_names(shape: Callable[[str], tuple], keys: set[str]) -> dict:
    inner, in_ch = shape("img_in.weight")
    qn = "double_blocks.0.img_attn.norm.query_norm."
    head_dim = shape(qn + ("weight" if qn + "weight" in keys else "scale"))[0]
    txt_in = "semantic_txt_in.weight" if "semantic_txt_in.weight" in keys else "txt_in.weight"
    return dit_config(
        inner, in_ch, shape("final_layer.linear.weight")[0], head_dim, shape(txt_in)[1],
        2 * shape("double_blocks.0.img_mlp.gate_proj.weight")[0],
        len({k.split(".")[1] for k in keys if k.startswith("double_blocks.")}),
        len({k.split(".")[1] for k in keys if k.startswith("single_blocks.")}),
    )


def _dit_layout(ck: Checkpoint, path: str) -> Layout:
    """An Ovis-Image DiT in original names (converted as it is read) or in diffusers' (under any wrapper prefix)."""
    if not any(".img_attn.qkv." in k for k in ck):
        prefix = strip_prefix(ck.keys(), "x_embedder.weight")
        keys = {k[len(prefix):] for k in ck if k.startswith(prefix)}
        cfg, cfg_file = config_file_or(
            path, "Ovis-Image DiT", lambda: _config_from_diffusers_names(lambda k: ck.shape(prefix + k), keys))
        return Layout(cfg, cfg_file, key_map=under(prefix))
    prefix = strip_prefix(ck.keys(), "double_blocks.0.")
    keys = {k[len(prefix):] for k in ck if k.startswith(prefix)}
    shape = lambda k: ck.shape(prefix + k)  # noqa: E731
    plan = original_plan(keys, shape)
    used = {prefix + s for sources, _ in plan.values() for s in sources}
    extra = sorted(k for k in ck if k not in used)
    if extra:
        raise LetterpressError(
            f"Ovis-Image DiT: {os.path.basename(path)} holds {len(extra)} tensors an Ovis-Image DiT does not have "
            f"(e.g. {', '.join(extra[:3])}). It is another FLUX-style model."
        )
    state = _Converted(ck, {k: (tuple(prefix + s for s in src), fn) for k, (src, fn) in plan.items()})
    return Layout(_config_from_original_names(shape, keys), state=state)


def load_dit(path: str, storage: Storage) -> ModelHandle:
    from diffusers import OvisImageTransformer2DModel

    path = _component(path, "transformer")
    module = load_stage(path, storage, Stage("Ovis-Image DiT", (FAMILY, "Ovis-Image DiT"), "the Ovis-Image DiT loader",
                                             _dit_layout, OvisImageTransformer2DModel.from_config))
    return ModelHandle(FAMILY, "dit", module, source=path, scheduler=scheduler_settings(path, DEFAULT_SCHEDULE, "Ovis-Image scheduler"))


# Text encoder --------------------------------------------------------------------------------------


def tokenizer_folders(_role: str, path: str) -> list[str]:
    """Where the single-file text encoder loader looks for its tokenizer (SPEC.tokenizer_folders)."""
    return find_tokenizer_folders(path, in_diffusers_folders(PIPELINE_CLASSES, "tokenizer"))


def _tokenizer_for(path: str):
    what = "Ovis-Image text encoder"
    if os.path.isdir(path):  # a component folder of the diffusers layout: ../tokenizer
        return load_tokenizer([os.path.join(os.path.dirname(path.rstrip(os.sep)), "tokenizer"), path], what, TOKENIZER_HINT)
    return load_tokenizer(tokenizer_folders("text_encoder", path), what, TOKENIZER_HINT)


def load_text_encoder(path: str, storage: Storage) -> ModelHandle:
    from transformers import Qwen3Config, Qwen3Model

    path = _component(path, "text_encoder")
    module = load_stage(path, storage, llm_stage(
        "Ovis-Image text encoder", ("qwen3", "Qwen3 language model (the Ovis2.5 text encoder)"),
        "the Ovis-Image text encoder loader", Qwen3Config, Qwen3Model, QWEN3_TEMPLATE, "llm_config"))
    tokenizer = _tokenizer_for(path)
    if tokenizer.pad_token_id is None:
        raise LetterpressError("Ovis-Image text encoder: its tokenizer has no pad token; use the Ovis-Image tokenizer folder.")
    return ModelHandle(FAMILY, "text_encoder", module, tokenizer=tokenizer, source=path)


# VAE -----------------------------------------------------------------------------------------------


def load_flux1_vae(path: str, storage: Storage) -> ModelHandle:
    from diffusers import AutoencoderKL

    path = _component(path, "vae")
    module = load_stage(path, storage.unquantized(), vae_stage("FLUX.1 VAE", ("kl_vae", "FLUX.1 VAE"),
                                                               "the Ovis-Image VAE loader", AutoencoderKL,
                                                               FLUX1_VAE_TEMPLATE))
    channels = module.config.latent_channels
    if channels != LATENT_CHANNELS:
        raise LetterpressError(
            f"{os.path.basename(path)} is a {channels}-channel VAE; Ovis-Image decodes with the 16-channel FLUX.1 VAE "
            "(ae.safetensors). Pick that file in the Ovis-Image VAE loader."
        )
    return ModelHandle(FAMILY, "vae", module, source=path)


# Whole folder --------------------------------------------------------------------------------------


def load_folder(folder: str, storage: Storage) -> dict[str, ModelHandle]:
    check_pipeline(folder, PIPELINE_CLASSES, MODEL, REPO)
    return {
        "dit": load_dit(folder, storage),
        "text_encoder": load_text_encoder(folder, storage),
        "vae": load_flux1_vae(folder, storage),
    }
