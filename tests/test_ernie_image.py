"""ERNIE-Image: the staged node graph against diffusers' ErnieImagePipeline on a tiny random model."""

from __future__ import annotations

import os

import pytest
import torch

from fixtures.common import capture_previews
from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a poster with the words hello world in bold red letters"
OTHER = "a cat sitting on a wooden table, photo"


def node(name):
    return N["LetterpressErnieImage" + name]()


@pytest.fixture(scope="module")
def reference(ernie, models_dir):
    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, prompt, width, height, steps, cfg, seed, n=1):
    out = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=cfg,
               num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
               use_pe=False)
    return torch.from_numpy(out.images)


def graph(models, prompt, width, height, steps, cfg, seed, batch=1, shift=4.0, denoise=1.0, latent=None):
    dit, te, vae = models
    pos = node("TextEncode").run(te, prompt)[0]
    neg = node("TextEncode").run(te, "")[0] if cfg > 1 else None
    lat = latent or node("EmptyLatent").run(width, height, batch)[0]
    out = node("Sampler").run(dit, pos, lat, seed, steps, cfg, shift, denoise, negative=neg)[0]
    return node("VAEDecode").run(vae, out)[0]


@pytest.fixture(scope="module")
def folder_models(ernie):
    dit, te, vae, _pe = node("FolderLoader").run("ERNIE-Image", "auto", False)
    return dit, te, vae


@pytest.fixture(scope="module")
def file_models(ernie):
    return (node("DiTLoader").run("ernie-image.safetensors", "auto")[0],
            node("TextEncoderLoader").run("ministral-3-3b.safetensors", "auto")[0],
            node("VAELoader").run("flux2-vae.safetensors", "auto")[0])


def test_tiny_model_sees_the_prompt(folder_models):
    """Guard for every parity figure below: the tiny model's image depends on the prompt."""
    a = graph(folder_models, PROMPT, 32, 32, 2, 4.0, 1)
    b = graph(folder_models, OTHER, 32, 32, 2, 4.0, 1)
    assert (a - b).abs().max() > 0.05
    assert a.std() > 0.02  # not a flat or saturated image


@pytest.mark.parametrize("width,height,steps,cfg,batch", [
    (48, 64, 3, 4.0, 1),   # base preset shape: CFG, non-square
    (32, 32, 2, 1.0, 2),   # Turbo preset shape: no unconditional pass, batch of 2
    (64, 32, 2, 4.0, 2),   # CFG with a batch
])
def test_parity_diffusers_layout(reference, folder_models, width, height, steps, cfg, batch):
    ref = reference_images(reference, PROMPT, width, height, steps, cfg, seed=7, n=batch)
    ours = graph(folder_models, PROMPT, width, height, steps, cfg, seed=7, batch=batch)
    assert ours.shape == ref.shape == (batch, height, width, 3)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_parity_single_files(reference, file_models):
    ref = reference_images(reference, PROMPT, 48, 32, 3, 4.0, seed=3)
    ours = graph(file_models, PROMPT, 48, 32, 3, 4.0, seed=3)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_seed_changes_image_and_repeats(folder_models):
    a = graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=1)
    b = graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=1)
    c = graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.05


def test_prompt_enhancer_greedy_matches_reference(reference, ernie):
    pe = node("PromptEnhancerLoader").run("ernie-image-prompt-enhancer.safetensors", "auto")[0]
    # The reference decodes greedily when temperature and top_p are both 1.0; the node when temperature is 0.
    max_new = reference.pe_tokenizer.model_max_length
    for prompt in ("a cat", "neon sign that says open"):
        ref = reference._enhance_prompt_with_pe(prompt, torch.device("cpu"), width=64, height=48,
                                                temperature=1.0, top_p=1.0)
        ours = node("PromptEnhance").run(pe, prompt, 64, 48, 0, 0.0, 1.0, max_new)[0]
        assert ours == ref and ours


def test_shipped_enhanced_workflow_matches_the_pipeline_default(reference, host):
    """workflows/api/ernie_image_enhanced_t2i_api.json (Prompt Enhance -> Text Encode, sampled at the pipeline's
    temperature 0.6 / top_p 0.95 and the fixture's pe/generation_config.json, top_k 20 and repetition penalty 1.3)
    draws the pipeline's image with use_pe left at its default (True), the enhancer seeded alike and given the
    same token cap; another enhancer seed rewrites the prompt into another image."""
    from letterpress.runner import Runner, load_workflow, set_values

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wf = load_workflow(os.path.join(root, "workflows", "api", "ernie_image_enhanced_t2i_api.json"))
    prompt = wf["4"]["inputs"]["prompt"]
    max_new = reference.pe_tokenizer.model_max_length  # the pipeline's max_new_tokens
    small = ["width=48", "height=32", "steps=2", f"max_new_tokens={max_new}", "8.seed=5"]
    runner = Runner()
    results = runner.run(set_values(wf, small + ["4.seed=7"]))["results"]
    torch.manual_seed(7)  # the pipeline samples its enhancer with torch's global generator
    ref = reference(prompt, height=32, width=48, num_inference_steps=2, guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(5), output_type="np")
    assert results["4"][0] == ref.revised_prompts[0] != prompt
    assert (results["9"][0] - torch.from_numpy(ref.images)).abs().max() < 1e-4
    other = runner.run(set_values(wf, small + ["4.seed=8"]))["results"]
    assert other["4"][0] != results["4"][0]
    assert (other["9"][0] - results["9"][0]).abs().max() > 0.05


def test_image_to_image_keeps_the_input(folder_models):
    dit, te, vae = folder_models
    source = graph(folder_models, PROMPT, 32, 32, 3, 1.0, seed=11)
    # VAE Encode matches diffusers' own encoder followed by the pipeline's normalisation.
    lat = node("VAEEncode").run(vae, source)[0]
    x = source.permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        raw = vae.module.encode(x).latent_dist.mode()
    from diffusers import ErnieImagePipeline

    patched = ErnieImagePipeline._patchify_latents(raw)
    mean = vae.module.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.module.bn.running_var.view(1, -1, 1, 1) + 1e-5)
    assert torch.allclose(lat["samples"], (patched - mean) / std, atol=1e-5)
    # denoise 1.0 ignores the input.
    full = graph(folder_models, OTHER, 32, 32, 4, 1.0, seed=5, latent=lat)
    t2i = graph(folder_models, OTHER, 32, 32, 4, 1.0, seed=5)
    assert torch.equal(full, t2i)


@pytest.mark.parametrize("steps,denoise", [(6, 0.5), (7, 0.55)])  # 7 x 0.55 = 3.85: diffusers runs 4 steps
def test_partial_denoise_matches_diffusers_img2img_convention(reference, folder_models, steps, denoise):
    """denoise d runs the steps diffusers' img2img pipelines run (their get_timesteps) from the input noised with
    the scheduler's scale_noise; rebuilt here from the reference's own components."""
    import types

    from diffusers import FluxImg2ImgPipeline

    dit, te, vae = folder_models
    seed = 9
    init = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(1))
    ours = node("Sampler").run(dit, node("TextEncode").run(te, PROMPT)[0],
                               {"samples": init, "family": "ernie_image"}, seed, steps, 1.0, 4.0, denoise)[0]

    sched = reference.scheduler
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1])
    timesteps, run = FluxImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sched), steps, denoise, "cpu")
    assert run == len(timesteps) == (4 if steps == 7 else 3)
    noise = torch.randn(init.shape, generator=torch.Generator("cpu").manual_seed(seed))
    x = sched.scale_noise(init, timesteps[:1], noise)
    text = reference.encode_prompt(PROMPT, torch.device("cpu"))
    text_bth, lens = reference._pad_text(text, torch.device("cpu"), torch.float32, 64)
    with torch.no_grad():
        for t in timesteps:
            v = reference.transformer(hidden_states=x, timestep=t.expand(1), text_bth=text_bth, text_lens=lens,
                                      return_dict=False)[0]
            x = sched.step(v, t, x).prev_sample
    assert (ours["samples"] - x).abs().max().item() <= 1e-5


def test_progress_moves_and_cancel_stops_mid_run(folder_models, host):
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    graph(folder_models, PROMPT, 32, 32, 3, 1.0, seed=1)
    assert ticks[-3:] == [(1, 3), (2, 3), (3, 3)]

    ticks.clear()

    def cancel_after_two(done, total):
        if done == 2:
            host.request_interrupt()

    host.progress_listeners.append(cancel_after_two)
    with pytest.raises(Interrupted):
        graph(folder_models, PROMPT, 32, 32, 6, 1.0, seed=1)
    assert max(d for d, _ in ticks) == 2  # stopped within one step of the request
    host.progress_listeners.clear()
    assert graph(folder_models, PROMPT, 32, 32, 2, 1.0, seed=1).shape == (1, 32, 32, 3)  # usable afterwards


# Bad input --------------------------------------------------------------------------------------


def test_size_not_multiple_of_16(folder_models):
    with pytest.raises(LetterpressError, match="multiple of 16.*Use 32 or 48"):
        node("EmptyLatent").run(40, 32, 1)


def test_wrong_family_file_in_loader(ernie):
    with pytest.raises(LetterpressError, match="Flux2 VAE.*not ERNIE-Image DiT"):
        node("DiTLoader").run("../vae/flux2-vae.safetensors", "auto")
    with pytest.raises(LetterpressError, match="ERNIE-Image DiT, not Flux2 VAE"):
        node("VAELoader").run("../diffusion_models/ernie-image.safetensors", "auto")
    with pytest.raises(LetterpressError, match="not Ministral-3"):
        node("TextEncoderLoader").run("../diffusion_models/ernie-image.safetensors", "auto")


def test_missing_and_truncated_files(ernie, models_dir, tmp_path):
    with pytest.raises(LetterpressError, match="'nope.safetensors' was not found"):
        node("DiTLoader").run("nope.safetensors", "auto")
    good = os.path.join(models_dir, "diffusion_models", "ernie-image.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(good, "rb").read()[:-1000])
    with pytest.raises(LetterpressError, match="truncated"):
        node("DiTLoader").run(str(cut), "auto")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LetterpressError, match="empty"):
        node("DiTLoader").run(str(empty), "auto")


def test_missing_tokenizer_is_named(ernie, models_dir, tmp_path, host):
    # A models tree holding only the single-file text encoder, with no ERNIE-Image folder beside it.
    lone = tmp_path / "models" / "text_encoders"
    lone.mkdir(parents=True)
    os.symlink(os.path.join(models_dir, "text_encoders", "ministral-3-3b.safetensors"), lone / "te.safetensors")
    host.models_dir = str(tmp_path / "models")
    with pytest.raises(LetterpressError, match="no tokenizer found.*models/diffusers/ERNIE-Image"):
        node("TextEncoderLoader").run("te.safetensors", "auto")


def test_cfg_without_negative_and_foreign_latent(folder_models):
    dit, te, _ = folder_models
    pos = node("TextEncode").run(te, PROMPT)[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    with pytest.raises(LetterpressError, match="needs a negative"):
        node("Sampler").run(dit, pos, lat, 0, 2, 4.0, 4.0, 1.0)
    with pytest.raises(LetterpressError, match="made for Ovis-Image"):
        node("Sampler").run(dit, pos, {"samples": lat["samples"], "family": "ovis_image"}, 0, 2, 1.0, 4.0, 1.0)
    with pytest.raises(LetterpressError, match="denoise"):
        node("Sampler").run(dit, pos, lat, 0, 2, 1.0, 4.0, 0.0)
    with pytest.raises(LetterpressError, match="finite"):
        node("Sampler").run(dit, pos, lat, 0, 2, float("nan"), 4.0, 1.0)


def test_live_previews_when_the_host_shows_them(folder_models, host):
    shown = capture_previews(host)
    graph(folder_models, PROMPT, 32, 48, 2, 1.0, seed=1)
    assert shown == [None, None]  # the standalone host shows none, so none are made
    host.previews = True
    graph(folder_models, PROMPT, 32, 48, 2, 1.0, seed=1)
    assert len(shown) == 4 and all(p is not None for p in shown[2:])
    assert shown[-1].size[0] / shown[-1].size[1] == 32 / 48  # the latent's aspect


def test_turbo_dit_warns_about_base_settings(ernie, caplog):
    import logging

    dit, te, _, _ = node("FolderLoader").run("ERNIE-Image-Turbo", "auto", False)
    pos = node("TextEncode").run(te, PROMPT)[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    with caplog.at_level(logging.WARNING, logger="letterpress"):
        node("Sampler").run(dit, pos, lat, 0, 2, 1.0, 4.0, 1.0)
        assert not caplog.records
        node("Sampler").run(dit, pos, lat, 0, 2, 4.0, 4.0, 1.0, negative=pos)
    assert any("Turbo" in r.message for r in caplog.records)
