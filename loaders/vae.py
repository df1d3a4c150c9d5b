"""VAE loading shared by every family: diffusers folders, diffusers-named single files, and the
original (LDM / Black Forest Labs) key names that ComfyUI users have, converted by diffusers' own
`convert_ldm_vae_checkpoint`."""

from __future__ import annotations

import re

from .errors import LetterpressError
from .stage import Layout, Stage, config_file_or
from .weights import Checkpoint

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


def vae_stage(what: str, signature: tuple[str, str], loader: str, vae_cls, template: dict) -> Stage:
    """The stage of a VAE (stage.load_stage) from a diffusers `vae/` folder or a single file in either naming: its
    settings from the folder's config.json, else read off the shapes over `template`; original (LDM) names converted.
    Load it unquantized (Storage.unquantized): a VAE is convolutions and few, small Linear layers."""

    def read(ck: Checkpoint, path: str) -> Layout:
        if _is_ldm(ck.keys()):
            state: dict | Checkpoint = _ldm_to_diffusers(ck, template)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        else:
            state = ck
            shapes = {k: ck.shape(k) for k in ck}
        cfg, cfg_file = config_file_or(path, what, lambda: infer_vae_config(shapes, template))
        return Layout(cfg, cfg_file, state=state)

    return Stage(what, signature, loader, read, vae_cls.from_config, keep_fp32=("bn.running",))
