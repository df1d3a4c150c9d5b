"""Ovis-Image: the staged node graph against diffusers' OvisImagePipeline on a tiny random model, in the
diffusers layout and as the single files users have; the shipped workflow through the headless runner; bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from letterpress import cli
from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a poster with the words hello world in bold red letters"
OTHER = "neon sign that says open late, rainy street at night"
# Far longer than max_sequence_length (256) in the tiny tokenizer; the reference cuts it.
LONG = " ".join(["the quick brown fox jumps over the lazy dog 0123456789, a vintage letterpress print"] * 12)
WORKFLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows",
                        "api", "ovis_image_t2i_api.json")


def node(name):
    return N["LetterpressOvisImage" + name]()


@pytest.fixture(scope="module")
def reference(ovis, models_dir):
    from diffusers import OvisImagePipeline

    pipe = OvisImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "Ovis-Image-7B"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, prompt, width, height, steps, cfg, seed, n=1, msl=256):
    out = pipe(prompt, negative_prompt="", height=height, width=width, num_inference_steps=steps,
               guidance_scale=cfg, num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", max_sequence_length=msl)
    return torch.from_numpy(out.images)


def graph(models, prompt, width, height, steps, cfg, seed, batch=1, msl=256, denoise=1.0, latent=None):
    dit, te, vae = models
    pos, neg = node("TextEncode").run(te, prompt, "", msl)
    lat = latent or node("EmptyLatent").run(width, height, batch)[0]
    out = node("Sampler").run(dit, pos, lat, seed, steps, cfg, denoise, negative=neg if cfg > 1 else None)[0]
    return node("VAEDecode").run(vae, out)[0]


def _on_session_models(session_host):
    """Module fixtures run before the per-test host is set: load through the session's models tree whatever
    host an earlier test module left behind."""
    from letterpress.loaders.host import set_host

    set_host(session_host)


@pytest.fixture(scope="module")
def folder_models(ovis, session_host):
    _on_session_models(session_host)
    return node("FolderLoader").run("Ovis-Image-7B", "auto")


@pytest.fixture(scope="module")
def file_models(ovis, session_host):
    _on_session_models(session_host)
    return (node("DiTLoader").run("ovis_image.safetensors", "auto")[0],
            node("TextEncoderLoader").run("ovis_2.5.safetensors", "auto")[0],
            node("VAELoader").run("ae.safetensors", "auto")[0])


def test_packing_is_the_references():
    from diffusers import OvisImagePipeline

    from letterpress.samplers.latents import pack_2x2_tokens, unpack_2x2_tokens

    x = torch.randn(2, 16, 4, 6)
    packed = OvisImagePipeline._pack_latents(x, 2, 16, 4, 6)
    assert torch.equal(pack_2x2_tokens(x), packed)
    assert torch.equal(unpack_2x2_tokens(packed, 4, 6), OvisImagePipeline._unpack_latents(packed, 32, 48, 8))


def test_tiny_model_sees_the_prompt(folder_models):
    """Guard for every parity figure below: the tiny model's image depends on the prompt."""
    a = graph(folder_models, PROMPT, 32, 32, 2, 5.0, 1)
    b = graph(folder_models, OTHER, 32, 32, 2, 5.0, 1)
    assert (a - b).abs().max() > 0.05
    assert a.std() > 0.02  # not a flat or saturated image


@pytest.mark.parametrize("width,height,steps,cfg,batch", [
    (48, 32, 2, 5.0, 2),  # CFG (two passes), non-square, batch of 2 from one prompt
    (32, 32, 3, 1.0, 1),  # no CFG: no negative pass
])
def test_parity_diffusers_layout(reference, folder_models, width, height, steps, cfg, batch):
    ref = reference_images(reference, PROMPT, width, height, steps, cfg, seed=7, n=batch)
    ours = graph(folder_models, PROMPT, width, height, steps, cfg, seed=7, batch=batch)
    assert ours.shape == ref.shape == (batch, height, width, 3)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_prompt_longer_than_max_sequence_length(reference, folder_models, caplog):
    import logging

    _, te, _ = folder_models
    from letterpress.samplers.ovis_image import chat_text

    assert len(te.tokenizer(LONG, add_special_tokens=False).input_ids) > 256
    with caplog.at_level(logging.WARNING, logger="letterpress"):
        pos = node("TextEncode").run(te, LONG, "", 256)[0]
    assert any("tokens are dropped" in r.message for r in caplog.records)  # the user is told how much
    assert pos.embeds[0].shape[0] == 256 and pos.extras["truncated"]
    # Cut like the reference: words past the limit change nothing, the first words do.
    assert torch.equal(node("TextEncode").run(te, LONG + " and a red balloon", "", 256)[0].embeds[0], pos.embeds[0])
    assert not torch.equal(node("TextEncode").run(te, "a" + LONG[3:], "", 256)[0].embeds[0], pos.embeds[0])
    assert len(te.tokenizer(chat_text(te.tokenizer, PROMPT)).input_ids) < 256 + 28  # the short prompt is not cut
    ref = reference_images(reference, LONG, 32, 48, 2, 5.0, seed=2)
    ours = graph(folder_models, LONG, 32, 48, 2, 5.0, seed=2)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_single_files_hold_the_same_model(folder_models, file_models):
    """The original and ComfyUI DiT files, ovis_2.5 and ae.safetensors load to exactly the diffusers weights."""
    comfy_dit = node("DiTLoader").run("ovis_image_bf16.safetensors", "auto")[0]
    pairs = list(zip(folder_models, file_models)) + [(folder_models[0], comfy_dit)]
    for a, b in pairs:
        sa, sb = a.module.state_dict(), b.module.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), b.describe()
    # The architecture read off the tensors is the one the folder's config.json states.
    plain = lambda cfg: {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # noqa: E731
    for dit in (file_models[0], comfy_dit):
        assert plain(dit.module.config) == plain(folder_models[0].module.config)


def test_text_encoder_inside_a_wrapper_file(folder_models, models_dir):
    """An Ovis2.5 export with the LM under `llm.model.` beside vision tensors loads the same Qwen3 weights."""
    from safetensors.torch import load_file

    src = load_file(os.path.join(models_dir, "text_encoders", "ovis_2.5.safetensors"))
    wrapped = {"llm." + k: v for k, v in src.items()}
    wrapped["visual_tokenizer.vit.patch_embed.weight"] = torch.zeros(4, 3)
    wrapped["vte.weight"] = torch.zeros(8, 32)
    te = load_rewritten(models_dir, "text_encoders", "ovis_2.5_wrapped.safetensors", wrapped, "TextEncoderLoader")
    assert_same_weights(folder_models[1], te)


def load_rewritten(models_dir, kind, filename, tensors, loader):
    """Save `tensors` as models/<kind>/<filename>, load it with the loader node, remove the file again."""
    from safetensors.torch import save_file

    path = os.path.join(models_dir, kind, filename)
    save_file(tensors, path)
    try:
        return node(loader).run(filename, "auto")[0]
    finally:
        os.remove(path)


def assert_same_weights(a, b):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_vae_file_under_a_checkpoint_prefix(folder_models, models_dir, prefix):
    """ae.safetensors with its keys under a full checkpoint's VAE prefix loads the same weights."""
    from safetensors.torch import load_file

    src = load_file(os.path.join(models_dir, "vae", "ae.safetensors"))
    prefixed = {prefix + k: v for k, v in src.items()}
    assert_same_weights(folder_models[2], load_rewritten(models_dir, "vae", "ae_prefixed.safetensors", prefixed, "VAELoader"))


def test_parity_single_files(reference, file_models):
    ref = reference_images(reference, OTHER, 48, 32, 2, 5.0, seed=3)
    ours = graph(file_models, OTHER, 48, 32, 2, 5.0, seed=3)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_seed_changes_image_and_repeats(folder_models):
    a = graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=1)
    assert torch.equal(a, graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=1))
    assert (a - graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=2)).abs().max() > 0.05


def test_vae_encode_and_partial_denoise_follow_diffusers_img2img(reference, folder_models):
    """VAE Encode normalises like diffusers' FLUX img2img; denoise d runs the last int(d*N) steps from the input
    noised with the scheduler's scale_noise. Rebuilt here from the reference pipeline's own parts."""
    from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift

    dit, te, vae = folder_models
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    lat = node("VAEEncode").run(vae, image)[0]
    with torch.no_grad():
        raw = reference.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    cfg = reference.vae.config
    assert torch.allclose(lat["samples"], (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-5)

    steps, denoise, seed = 4, 0.5, 9
    pos = node("TextEncode").run(te, PROMPT, "", 256)[0]
    ours = node("Sampler").run(dit, pos, lat, seed, steps, 1.0, denoise)[0]["samples"]

    sched = reference.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(4))
    first = steps - int(steps * denoise)
    timesteps = sched.timesteps[first:]
    sched.set_begin_index(first)
    noise = torch.randn(lat["samples"].shape, generator=torch.Generator("cpu").manual_seed(seed))
    pack = lambda t: reference._pack_latents(t, 1, 16, 4, 4)  # noqa: E731
    x = sched.scale_noise(pack(lat["samples"]), timesteps[:1], pack(noise))
    embeds, _, text_ids, _ = reference.encode_prompt(PROMPT, do_classifier_free_guidance=False, device=torch.device("cpu"))
    img_ids = reference._prepare_latent_image_ids(1, 2, 2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for t in timesteps:
            v = reference.transformer(hidden_states=x, timestep=t.expand(1) / 1000, encoder_hidden_states=embeds,
                                      txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
    assert (ours - reference._unpack_latents(x, 32, 32, 8)).abs().max().item() <= 1e-5
    # denoise 1.0 ignores the input latent.
    t2i = graph(folder_models, OTHER, 32, 32, 2, 1.0, seed=5)
    assert torch.equal(graph(folder_models, OTHER, 32, 32, 2, 1.0, seed=5, latent=lat), t2i)


def test_shipped_workflow_runs_headless(reference, models_dir, tmp_path, capsys):
    args = ["run", WORKFLOW, "--models-dir", models_dir, "--output-dir", str(tmp_path), "--quiet"]
    for s in ("width=32", "height=32", "steps=2", f"prompt={PROMPT}"):
        args += ["--set", s]
    assert cli.main(args) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and written[0].endswith("_00001_.png")
    img = Image.open(written[0])
    embedded = json.loads(img.text["prompt"])
    assert [n["inputs"]["prompt"] for n in embedded.values() if n["_meta"]["title"] == "Prompt"] == [PROMPT]
    # The PNG is the reference image at the workflow's seed (42) and CFG (5.0), up to 8-bit rounding.
    seed = json.load(open(WORKFLOW))["4"]["inputs"]["seed"]
    ref = reference_images(reference, PROMPT, 32, 32, 2, 5.0, seed=seed)[0]
    png = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    assert png.shape == (32, 32, 3)
    assert (png - ref).abs().max().item() <= 1 / 255 + 1e-4


# Bad input ---------------------------------------------------------------------------------------


def test_size_not_multiple_of_16(folder_models):
    dit, te, vae = folder_models
    with pytest.raises(LetterpressError, match="Ovis-Image needs width to be a positive multiple of 16.*Use 32 or 48"):
        node("EmptyLatent").run(40, 32, 1)
    with pytest.raises(LetterpressError, match="height to be a positive multiple of 16"):
        node("VAEEncode").run(vae, torch.rand(1, 24, 32, 3))
    pos, neg = node("TextEncode").run(te, PROMPT, "", 256)
    with pytest.raises(LetterpressError, match="even latent sizes"):
        node("Sampler").run(dit, pos, {"samples": torch.zeros(1, 16, 5, 4), "family": "ovis_image"}, 0, 2, 1.0, 1.0)


def test_wrong_family_file_in_loader(ovis, ernie):
    ernie_nodes = lambda name: N["LetterpressErnieImage" + name]()  # noqa: E731
    with pytest.raises(LetterpressError, match="holds a ERNIE-Image DiT, not Ovis-Image DiT"):
        node("DiTLoader").run("ernie-image.safetensors", "auto")
    with pytest.raises(LetterpressError, match="Ministral-3 .*not Qwen3"):
        node("TextEncoderLoader").run("ministral-3-3b.safetensors", "auto")
    with pytest.raises(LetterpressError, match="Flux2 VAE .*not FLUX.1 VAE"):
        node("VAELoader").run("flux2-vae.safetensors", "auto")
    with pytest.raises(LetterpressError, match="ERNIE-Image holds an ErnieImagePipeline \\(ERNIE-Image\\); this Ovis-Image loader needs an "
                       "OvisImagePipeline. Use an ERNIE-Image loader for this folder, or download .*AIDC-AI/Ovis-Image-7B"):
        node("FolderLoader").run("ERNIE-Image", "auto")
    # ... and the reverse.
    with pytest.raises(LetterpressError, match="holds a Ovis-Image DiT \\(original names\\), not ERNIE-Image DiT"):
        ernie_nodes("DiTLoader").run("ovis_image_bf16.safetensors", "auto")
    with pytest.raises(LetterpressError, match="Qwen3 .*not Ministral-3"):
        ernie_nodes("TextEncoderLoader").run("ovis_2.5.safetensors", "auto")
    with pytest.raises(LetterpressError, match="16-channel KL VAE.*not Flux2 VAE"):
        ernie_nodes("VAELoader").run("ae.safetensors", "auto")


def test_foreign_conditioning_and_latent(folder_models, ernie):
    dit, te, _ = folder_models
    ernie_te = N["LetterpressErnieImageTextEncoderLoader"]().run("ministral-3-3b.safetensors", "auto")[0]
    ernie_cond = N["LetterpressErnieImageTextEncode"]().run(ernie_te, PROMPT)[0]
    pos, neg = node("TextEncode").run(te, PROMPT, "", 256)
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    with pytest.raises(LetterpressError, match="came from the ERNIE-Image text encoder.*Ovis-Image sampler needs"):
        node("Sampler").run(dit, ernie_cond, lat, 0, 2, 5.0, 1.0, negative=neg)
    with pytest.raises(LetterpressError, match="negative conditioning came from the ERNIE-Image"):
        node("Sampler").run(dit, pos, lat, 0, 2, 5.0, 1.0, negative=ernie_cond)
    ernie_lat = N["LetterpressErnieImageEmptyLatent"]().run(32, 32, 1)[0]
    with pytest.raises(LetterpressError, match="made for ERNIE-Image"):
        node("Sampler").run(dit, pos, ernie_lat, 0, 2, 1.0, 1.0)
    with pytest.raises(LetterpressError, match="needs a negative"):
        node("Sampler").run(dit, pos, lat, 0, 2, 5.0, 1.0)
    with pytest.raises(LetterpressError, match="max_sequence_length must be between 1 and 256"):
        node("TextEncode").run(te, PROMPT, "", 300)


def test_flux1_file_and_lone_text_encoder(ovis, models_dir, tmp_path, host, monkeypatch):
    from safetensors.torch import save_file

    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "double_blocks.0.img_mlp.0.weight": torch.zeros(8, 2),
            "single_blocks.0.linear1.weight": torch.zeros(14, 2), "txt_in.weight": torch.zeros(2, 4),
            "vector_in.in_layer.weight": torch.zeros(2, 3)}
    save_file(flux, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(LetterpressError, match="holds a FLUX.1 DiT, not Ovis-Image DiT"):
        node("DiTLoader").run(str(tmp_path / "flux1-dev.safetensors"), "auto")
    # A models tree holding only the single-file text encoder, with no Ovis-Image folder to take the tokenizer from.
    lone = tmp_path / "models" / "text_encoders"
    lone.mkdir(parents=True)
    os.symlink(os.path.join(models_dir, "text_encoders", "ovis_2.5.safetensors"), lone / "ovis_2.5.safetensors")
    monkeypatch.setattr(host, "models_dir", str(tmp_path / "models"))  # restored for the module fixtures after
    with pytest.raises(LetterpressError, match="no tokenizer found.*models/diffusers/Ovis-Image-7B"):
        node("TextEncoderLoader").run("ovis_2.5.safetensors", "auto")
