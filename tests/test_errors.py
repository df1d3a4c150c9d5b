"""Bad input and faults on the foundation: each gives one clear error (what is wrong, what to do)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from letterpress.loaders.host import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N


def node(name):
    return N["LetterpressErnieImage" + name]()


def test_pickle_checkpoints_are_refused(ernie, models_dir, tmp_path):
    path = tmp_path / "ernie-image.ckpt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(LetterpressError, match="pickle checkpoint.*\\.safetensors"):
        node("DiTLoader").run(str(path), "auto")


def test_folder_missing_a_component(ernie, models_dir, tmp_path, host):
    broken = tmp_path / "models" / "diffusers" / "ERNIE-Image"
    shutil.copytree(os.path.join(models_dir, "diffusers", "ERNIE-Image"), broken)
    shutil.rmtree(broken / "vae")
    host.models_dir = str(tmp_path / "models")
    with pytest.raises(LetterpressError, match="lacks its vae/ folder"):
        node("FolderLoader").run("ERNIE-Image", "auto", False)


def test_not_an_ernie_folder(ernie, models_dir, tmp_path, host):
    other = tmp_path / "models" / "diffusers" / "Other"
    other.mkdir(parents=True)
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    host.models_dir = str(tmp_path / "models")
    with pytest.raises(LetterpressError, match="not an ERNIE-Image folder \\(FluxPipeline\\)"):
        node("FolderLoader").run("Other", "auto", False)


def test_parameters_out_of_range(ernie):
    with pytest.raises(LetterpressError, match="batch must be at least 1"):
        node("EmptyLatent").run(32, 32, 0)
    dit, te, _, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    pos = node("TextEncode").run(te, "x")[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    with pytest.raises(LetterpressError, match="runs no step"):
        node("Sampler").run(dit, pos, lat, 0, 0, 1.0, 4.0, 1.0)
    with pytest.raises(LetterpressError, match="seed must be between 0 and 2\\^64-1"):
        node("Sampler").run(dit, pos, lat, 2**64, 2, 1.0, 4.0, 1.0)


def test_empty_prompt_works_and_long_prompt_warns(ernie, caplog):
    _, te, _, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    empty = node("TextEncode").run(te, "")[0]
    assert empty.embeds[0].shape[0] >= 1
    limit = te.tokenizer.model_max_length
    with caplog.at_level(logging.WARNING, logger="letterpress"):
        long = node("TextEncode").run(te, "typography " * (limit + 50))[0]
    assert long.embeds[0].shape[0] == limit
    assert any("tokens are dropped" in r.message and str(limit) in r.message for r in caplog.records)


def test_fp16_overflow_is_named_not_a_black_image(ernie):
    dit, te, vae, _ = node("FolderLoader").run("ERNIE-Image", "fp16", False)
    pos = node("TextEncode").run(te, "x")[0]
    huge = {"samples": torch.full((1, 128, 2, 2), 1e6), "family": "ernie_image"}
    with pytest.raises(LetterpressError, match="ERNIE-Image DiT produced .* non-finite .* float16.*bf16 or fp32"):
        node("Sampler").run(dit, pos, huge, 0, 2, 1.0, 4.0, 0.5)
