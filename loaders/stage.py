"""The stage-loader sequence, written once for every family: open the checkpoint, check that it holds the model the
loader expects, read the model's settings (its config.json, or its tensor shapes), build the module empty, choose its
layers (the host's layer table, asked once), fill them (weights.fill_module, which only fills), and hand the module
to the family's loader, which makes its handle.

A family gives its own parts as a `Stage`: what the file must hold, how to read its layout (settings, key names, a
converted view of its tensors) and how to build the module from the settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import layers, quantize
from .checkpoint import view
from .detect import expect
from .files import read_json
from .host import get_host
from .storage import Storage
from .weights import Checkpoint, build_empty, fill_module, open_checkpoint


def _same(key: str) -> str:
    return key


@dataclass(frozen=True)
class Layout:
    """What a family reads off an opened checkpoint: the settings its model is built from (a dict for diffusers'
    from_config, a transformers config), the config.json they came from (None: read off the shapes), how the file's
    keys map onto the module's (None drops a key), and the tensors under the module's names when they are not the
    file's own (a converter's lazy view)."""

    config: Any
    config_file: str | None = None
    key_map: Callable[[str], str | None] = _same
    state: Mapping | None = None


@dataclass(frozen=True)
class Stage:
    """One stage loader's own parts. `signature` is (detect's family key, the model's name in messages): what the
    file must hold; `read(checkpoint, path)` gives its Layout; `build(config)` the module (run on the meta device);
    `finish(module)` ties what the model shares once it is filled."""

    what: str
    signature: tuple[str, str]
    loader: str
    read: Callable[[Checkpoint, str], Layout]
    build: Callable[[Any], torch.nn.Module]
    keep_fp32: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    finish: Callable[[torch.nn.Module], None] | None = None


def load_stage(path: str, storage: Storage, stage: Stage) -> torch.nn.Module:
    """The module of one stage, from the file or folder `path`, stored as `storage` says."""
    ck = open_checkpoint(path)
    expect(ck.keys(), stage.signature[0], stage.signature[1], os.path.basename(path), stage.loader)
    layout = stage.read(ck, path)
    state = ck if layout.state is None else view(layout.state, path)
    try:
        module = build_empty(lambda: stage.build(layout.config), layout.config_file)
        expected = dict(module.state_dict(keep_vars=True))  # as the model's own code built it (see fill_module)
        choose_layers(module, storage, packed=state.quantized)
        quantize_on = quantize.compute_device() if storage.quant is not None else None
        fill_module(module, state, layout.key_map, storage, keep_fp32=stage.keep_fp32, what=stage.what,
                    optional=stage.optional, source=path, quantize_on=quantize_on, expected=expected)
    except BaseException:
        ck.close()  # converted tensors view the file's memory map: none outlives a failed load
        layout = state = ck = expected = None
        raise
    if stage.finish is not None:
        stage.finish(module)
    module.eval()
    return module


def choose_layers(module: torch.nn.Module, storage: Storage, packed: bool = False) -> torch.nn.Module:
    """Rebuild `module`'s layers as the classes the host's layer table names for `storage` (asked once per stage),
    before any weight goes in; `packed`: the file holds quantized weights, which its Linear layers keep packed (as
    do those of a storage that quantizes at load)."""
    ops = get_host().layer_ops(storage.dtype)
    if packed or storage.quant is not None:
        ops = layers.with_quantized(ops)  # Linear weights stay packed, dequantized per call
    return layers.build_layers(module, ops)


def config_file_or(path: str, what: str, from_shapes: Callable[[], dict] | None = None) -> tuple[dict, str | None]:
    """(settings, the config.json they came from): a folder's config.json (keys starting with '_' dropped), else
    `from_shapes()` (a single file carries no config) with no file; without `from_shapes` the config.json must be
    there (a missing one is named)."""
    cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if from_shapes is not None and not (cfg_file and os.path.exists(cfg_file)):
        return from_shapes(), None
    return {k: v for k, v in read_json(cfg_file or os.path.join(path, "config.json"), what).items()
            if not k.startswith("_")}, cfg_file


def under(prefix: str) -> Callable[[str], str | None]:
    """A key map that takes the keys under `prefix` (a wrapper's, e.g. 'model.diffusion_model.') without it."""
    return lambda k: k[len(prefix):] if k.startswith(prefix) else None


def transformers_model(cls: type) -> Callable[[Any], torch.nn.Module]:
    """`build` for a transformers model class: built as the host's class for it (host.model_class)."""
    return lambda config: get_host().model_class(cls)(config)
