"""VAE loading shared by every family: diffusers folders, diffusers-named single files, and the
original (LDM / Black Forest Labs) key names that ComfyUI users have, converted by diffusers' own
`convert_ldm_vae_checkpoint`."""

from __future__ import annotations

import os
import re

import torch

from .errors import LetterpressError
from .weights import Checkpoint, build_empty, fill_module, open_checkpoint, read_json

LDM_PREFIXES = ("first_stage_model.", "vae.")


def _is_ldm(keys) -> bool:
    return any(".down.0.block." in k or k.startswith("encoder.down.") for k in keys)


def infer_vae_config(keys_shapes: dict, template: dict) -> dict:
    """Block widths, depth and channels read off diffusers-named keys, over the template config."""
    cfg = dict(template)
    widths = []
    i = 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in keys_shapes:
        widths.append(keys_shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0])
        i += 1
    if not widths:
        raise LetterpressError("VAE: the file has no encoder blocks; it is not a VAE checkpoint.")
    layers = len({k.split(".")[4] for k in keys_shapes if k.startswith("encoder.down_blocks.0.resnets.")})
    cfg.update(
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        in_channels=keys_shapes["encoder.conv_in.weight"][1],
        out_channels=keys_shapes["decoder.conv_out.weight"][0],
        latent_channels=keys_shapes["decoder.conv_in.weight"][1],
        mid_block_add_attention=any("mid_block.attentions" in k for k in keys_shapes),
        use_quant_conv="quant_conv.weight" in keys_shapes,
        use_post_quant_conv="post_quant_conv.weight" in keys_shapes,
    )
    return cfg


def _ldm_to_diffusers(ck: Checkpoint, template: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    raw = {k: ck[k] for k in ck}
    blocks = {int(m.group(1)) for k in raw if (m := re.search(r"(?:^|\.)encoder\.down\.(\d+)\.", k))}
    if not blocks:
        raise LetterpressError("VAE: the file has no encoder blocks (encoder.down.N.*); it is not a whole VAE checkpoint.")
    n_down = 1 + max(blocks)  # under any prefix (first_stage_model., vae.)
    cfg = {"down_block_types": ("DownEncoderBlock2D",) * n_down, "up_block_types": ("UpDecoderBlock2D",) * n_down}
    converted = convert_ldm_vae_checkpoint(raw, cfg)
    for k, v in raw.items():  # tensors diffusers' converter leaves alone (Flux2's batch-norm stats)
        bare = next((k[len(p) :] for p in LDM_PREFIXES if k.startswith(p)), k)
        if bare.startswith("bn."):
            converted[bare] = v
    return converted


def load_vae(path: str, vae_cls, template: dict, dtype: torch.dtype, what: str) -> torch.nn.Module:
    """Load a VAE from a diffusers `vae/` folder or a single file in either naming."""
    folder = path if os.path.isdir(path) else None
    ck = open_checkpoint(path)
    if _is_ldm(ck.keys()):
        state: dict | Checkpoint = _ldm_to_diffusers(ck, template)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    else:
        state = ck
        shapes = {k: ck.shape(k) for k in ck}
    cfg_file = os.path.join(folder, "config.json") if folder else None
    if cfg_file and os.path.exists(cfg_file):
        cfg = {k: v for k, v in read_json(cfg_file, what).items() if not k.startswith("_")}
    else:
        cfg, cfg_file = infer_vae_config(shapes, template), None
    module = build_empty(lambda: vae_cls.from_config(cfg), cfg_file)
    try:
        fill_module(module, state, dtype=dtype, what=what, keep_fp32=("bn.running",), source=path)
    except BaseException:
        state = ck = None  # converted tensors view the file's memory map: none outlives a failed load
        raise
    module.eval()
    return module
