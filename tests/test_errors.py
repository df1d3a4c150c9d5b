"""Bad input and faults on the foundation: each gives one clear error (what is wrong, what to do)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from letterpress.loaders.errors import LetterpressError
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
    with pytest.raises(LetterpressError, match="Other holds a FluxPipeline \\(FLUX.1\\); this ERNIE-Image loader needs an "
                       "ErnieImagePipeline. Instead, download the Hugging Face repository baidu/ERNIE-Image into"):
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


def test_fp8_weight_storage_halves_dit_weights_and_stays_close(ernie):
    """fp8 storage: Linear weights in fp8 (half of bf16), computed in bf16, close to the bf16 result."""
    def weight_bytes(handle):
        return sum(p.numel() * p.element_size() for p in handle.module.parameters())

    bf16 = node("DiTLoader").run("ernie-image.safetensors", "bf16")[0]
    fp8 = node("DiTLoader").run("ernie-image.safetensors", "fp8_e4m3fn")[0]
    linear = sum(m.weight.numel() for m in fp8.module.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes(bf16) - weight_bytes(fp8) == linear  # every Linear weight went from 2 bytes to 1
    assert fp8.dtype == torch.bfloat16
    _, te, _, _ = node("FolderLoader").run("ERNIE-Image", "bf16", False)
    pos = node("TextEncode").run(te, "a red poster")[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    a = node("Sampler").run(bf16, pos, lat, 1, 2, 1.0, 4.0, 1.0)[0]["samples"].float()
    b = node("Sampler").run(fp8, pos, lat, 1, 2, 1.0, 4.0, 1.0)[0]["samples"].float()
    assert torch.isfinite(b).all()
    other_seed = node("Sampler").run(bf16, pos, lat, 2, 2, 1.0, 4.0, 1.0)[0]["samples"].float()
    # fp8 keeps 3 mantissa bits: a toy model with large random weights drifts by ~10%, far less than a new seed.
    assert (a - b).abs().mean() < 0.25 * a.abs().mean()
    assert (a - b).abs().mean() < 0.3 * (a - other_seed).abs().mean()


def test_ovis_fp16_overflow_is_named_not_a_black_image(ovis):
    ovis_node = lambda name: N["LetterpressOvisImage" + name]()  # noqa: E731
    dit, te, vae = ovis_node("FolderLoader").run("Ovis-Image-7B", "fp16")
    pos, _ = ovis_node("TextEncode").run(te, "x", "", 256)
    huge = {"samples": torch.full((1, 16, 4, 4), 1e6), "family": "ovis_image"}
    with pytest.raises(LetterpressError, match="Ovis-Image DiT produced .* non-finite .* float16.*bf16 or fp32"):
        ovis_node("Sampler").run(dit, pos, huge, 0, 2, 1.0, 0.5)
    with pytest.raises(LetterpressError, match="FLUX.1 VAE decode produced .* non-finite .* float16.*bf16 or fp32"):
        ovis_node("VAEDecode").run(vae, huge)


def test_glm_fp16_overflow_is_named_not_a_black_image(glm):
    glm_node = lambda name: N["LetterpressGlmImage" + name]()  # noqa: E731
    ar, glyph, _, _ = glm_node("FolderLoader").run("GLM-Image", "auto")
    dit = glm_node("DiTLoader").run("GLM-Image", "fp16")[0]
    vae = glm_node("VAELoader").run("GLM-Image", "fp16")[0]
    prior, _ = glm_node("ARTokens").run(ar, "x", 32, 32, 0, 0.9, 0.75)
    pos, _ = glm_node("GlyphEncode").run(glyph, "x")
    # A block whose activations leave fp16's range (as large real activations do): inf, then NaN downstream.
    hook = dit.module.transformer_blocks[0].register_forward_hook(
        lambda mod, args, out: tuple(o * 1e5 if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        if isinstance(out, tuple) else out * 1e5)
    try:
        with pytest.raises(LetterpressError, match="GLM-Image DiT produced .* non-finite .* float16.*bf16 or fp32"):
            glm_node("Sampler").run(dit, prior, pos, 0, 2, 1.0)
    finally:
        hook.remove()
    huge = {"samples": torch.full((1, 16, 4, 4), 1e6), "family": "glm_image"}
    with pytest.raises(LetterpressError, match="GLM-Image VAE decode produced .* non-finite .* float16.*bf16 or fp32"):
        glm_node("VAEDecode").run(vae, huge)


def test_a_foreign_latent_into_vae_decode_is_named(ernie, glm):
    """A LATENT without a family (e.g. ComfyUI's own Empty Latent Image, 4 channels) is refused by shape."""
    core_latent = {"samples": torch.zeros(1, 4, 8, 8)}
    vae = node("FolderLoader").run("ERNIE-Image", "auto", False)[2]
    with pytest.raises(LetterpressError, match=r"ERNIE-Image needs \(batch, 128, H, W\) latents"):
        node("VAEDecode").run(vae, core_latent)
    glm_vae = N["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "auto")[3]
    with pytest.raises(LetterpressError, match=r"GLM-Image needs \(batch, 16, H, W\) latents"):
        N["LetterpressGlmImageVAEDecode"]().run(glm_vae, core_latent)


def test_latents_a_sampler_cannot_use_are_named(ernie, ovis):
    """ComfyUI's own 4-channel latent, a latent without batch or image dims and an empty batch are refused before
    any compute."""
    dit, te, _, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    pos = node("TextEncode").run(te, "x")[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    cases = [
        ({"samples": torch.zeros(1, 4, 4, 4)}, r"\(1, 4, 4, 4\); ERNIE-Image needs \(batch, 128, H, W\)"),
        ({"samples": torch.zeros(128, 2, 2)}, r"needs \(batch, 128, H, W\)"),
        ({**lat, "samples": lat["samples"][:0]}, "holds no image.*batch size of 1 or more"),
    ]
    for latent, message in cases:
        with pytest.raises(LetterpressError, match=message):
            node("Sampler").run(dit, pos, latent, 0, 1, 1.0, 1.0, 1.0)
    o = {k: N["LetterpressOvisImage" + k]() for k in ("FolderLoader", "TextEncode", "EmptyLatent", "Sampler")}
    odit, ote, _ = o["FolderLoader"].run("Ovis-Image-7B", "auto")
    opos, oneg = o["TextEncode"].run(ote, "x", "", 256)
    olat = o["EmptyLatent"].run(32, 32, 1)[0]
    with pytest.raises(LetterpressError, match="holds no image"):
        o["Sampler"].run(odit, opos, {**olat, "samples": olat["samples"][:0]}, 0, 1, 5.0, 1.0, negative=oneg)


def test_image_inputs_are_checked_and_grey_or_alpha_pictures_work(ernie, ovis):
    vae = node("FolderLoader").run("ERNIE-Image", "auto", False)[2]
    rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    grey = rgb[..., :1]
    as_rgb = node("VAEEncode").run(vae, grey.expand(-1, -1, -1, 3).contiguous())[0]["samples"]
    same = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0)  # memory layout may change the summation order
    assert same(node("VAEEncode").run(vae, grey)[0]["samples"], as_rgb)
    rgba = torch.cat([rgb, torch.zeros_like(grey)], -1)
    assert same(node("VAEEncode").run(vae, rgba)[0]["samples"], node("VAEEncode").run(vae, rgb)[0]["samples"])
    for bad in (rgb[0], rgb[..., :2], rgb[:0], rgb[None]):
        with pytest.raises(LetterpressError, match=r"ERNIE-Image VAE Encode: an IMAGE is \(batch >= 1, height, width"):
            node("VAEEncode").run(vae, bad)
    ovae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")[2]
    with pytest.raises(LetterpressError, match="Ovis-Image VAE Encode: an IMAGE is"):
        N["LetterpressOvisImageVAEEncode"]().run(ovae, rgb[0])
