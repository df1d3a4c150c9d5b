"""LoRA training on the tiny Ovis-Image: one step against diffusers' model + PEFT + torch's AdamW (the schedule from
diffusers' own scheduler), the loss falling, and the trained LoRA applied as its saved file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fixtures.lora_steps import assert_same_step, draw, peft_factors, peft_model, random_init, settings

from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.samplers import lora_training as training
from letterpress.samplers import ovis_image as ovis_stage

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a poster that says OPEN in red", "a sign with the word CLOSED in blue"]


def two_images(h=32, w=32):
    gen = torch.Generator().manual_seed(3)
    base = torch.linspace(0, 1, w).view(1, 1, w, 1).expand(2, h, w, 3).clone()
    return (0.5 * base + 0.5 * torch.rand(2, h, w, 3, generator=gen)).clamp(0, 1)


# Ovis-Image ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ovis_setup(ovis, models_dir):
    dit, te, vae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")
    ds = N["LetterpressTrainingDataset"]().run("unused", two_images(), "\n".join(CAPTIONS))[0]
    latents, conds = ovis_stage.encode_dataset(te, vae, ds, 32, max_sequence_length=16)
    return dict(dit=dit, te=te, vae=vae, latents=latents, conds=conds)


def ovis_reference_step(models_dir, init, latents, conds, d, rank, alpha, lr):
    """diffusers' OvisImageTransformer2DModel + PEFT, the pipeline's own packing, positions and scheduler (1000
    sigmas linspace(1, 1/1000) shifted by mu at the token count), timestep / 1000 into the DiT, plain MSE, AdamW."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift

    folder = os.path.join(models_dir, "diffusers", "Ovis-Image-7B")
    model, params = peft_model(OvisImageTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")), init,
                               rank, alpha)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    x0 = torch.cat([latents[i] for i in d.items])
    b, c, h, w = x0.shape
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    cfg = sched.config
    mu = calculate_shift((h // 2) * (w // 2), cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
    sigma = sched.sigmas[d.t_index].view(-1, 1, 1, 1)
    xt = sigma * d.noise + (1 - sigma) * x0
    pack = OvisImagePipeline._pack_latents
    embeds = torch.stack([conds[i] for i in d.items])
    txt_ids = torch.zeros(embeds.shape[1], 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(embeds.shape[1]).float()
    img_ids = OvisImagePipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    pred = model(hidden_states=pack(xt, b, c, h, w), timestep=sched.timesteps[d.t_index] / 1000,
                 encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    loss = ((pred - pack(d.noise - x0, b, c, h, w)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return peft_factors(model, init), loss.item()


def test_ovis_one_step_matches_diffusers_peft_and_adamw(ovis_setup, models_dir):
    s = ovis_setup
    targets = training.target_layers(s["dit"].module, "all")
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.proj_mlp",
            "single_transformer_blocks.1.attn.to_k"} <= set(targets)
    init = random_init(s["dit"].module, targets, 4, 1)
    record = []
    lora = training.train(s["dit"], ovis_stage.training_family(), s["latents"], s["conds"], settings(), init=init,
                          record=record)
    ref, ref_loss = ovis_reference_step(models_dir, init, s["latents"], s["conds"], record[0], 4, 2.0, 1e-2)
    assert_same_step(lora, ref, ref_loss, init)


def eval_loss(family, dit, latents, conds):
    from letterpress.loaders.host import get_host

    get_host().load(dit)
    gen = torch.Generator().manual_seed(123)
    draws = [draw(gen, latents, 2) for _ in range(12)]
    with torch.no_grad():
        return sum(training.flow_matching_loss(family, dit, dit.module, latents, conds, d).item()
                   for d in draws) / len(draws)


def test_ovis_loss_falls_and_the_saved_file_applies_as_trained(ovis_setup, models_dir):
    s = ovis_setup
    fam = ovis_stage.training_family()
    lora = training.train(s["dit"], fam, s["latents"], s["conds"],
                          settings(steps=40, learning_rate=5e-3, rank=8, alpha=8.0))
    before = eval_loss(fam, s["dit"], s["latents"], s["conds"])
    after = eval_loss(fam, N["LetterpressOvisImageApplyTrainedLoRA"]().run(s["dit"], lora, 1.0)[0], s["latents"],
                      s["conds"])
    assert after < 0.8 * before, (before, after)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    lora.save(os.path.join(models_dir, "loras", "trained_ovis.safetensors"))
    from_file = N["LetterpressOvisImageLoraLoader"]().run(s["dit"], "trained_ovis.safetensors", 1.0)[0]
    assert eval_loss(fam, from_file, s["latents"], s["conds"]) == after


# GLM-Image -------------------------------------------------------------------------------------------------------

GLM_CAPTIONS = ["a sign that says 'OPEN'", "a poster that says 'CLOSED NOW'"]


@pytest.fixture(scope="module")
def glm_setup(glm_models):
    from letterpress.samplers import glm_image as glm_stage

    m = glm_models
    ds = N["LetterpressTrainingDataset"]().run("unused", two_images(64, 96), "\n".join(GLM_CAPTIONS))[0]
    latents, conds = glm_stage.encode_dataset(m["ar"], m["glyph"], m["vae"], ds, 64)
    return dict(m, latents=latents, conds=conds, stage=glm_stage)


def test_glm_items_are_conditioned_on_their_images_prior_tokens(glm_setup):
    """The prior tokens of a training image are what the AR model's own vision tokenizer gives for it (the path
    GLM-Image editing takes for a reference image), one per DiT token of the image's latent."""
    s = glm_setup
    (tokens, glyphs), lat = s["conds"][0], s["latents"][0]
    p = s["dit"].module.config.patch_size
    assert tokens.shape == (1, (lat.shape[-2] // p) * (lat.shape[-1] // p))
    assert glyphs.shape[0] > 0
    assert not torch.equal(s["conds"][0][0], s["conds"][1][0])  # two different pictures, two token grids


def glm_reference_step(models_dir, init, latents, conds, d, rank, alpha, lr):
    """diffusers' GlmImageTransformer2DModel + PEFT; the pipeline's schedule through diffusers' scheduler (integer
    timesteps linspace(1000, 1), sigmas t / 1000 shifted by its calculate_shift mu); the DiT gets t - 1; each item
    with its prior tokens kept and its glyphs; mean of the items' MSE; AdamW."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    folder = os.path.join(models_dir, "diffusers", "GLM-Image")
    model, params = peft_model(GlmImageTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")), init,
                               rank, alpha)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    losses = []
    for k, i in enumerate(d.items):
        x0 = latents[i]
        _, _, lh, lw = x0.shape
        p = model.config.patch_size
        ts = np.linspace(sched.config.num_train_timesteps, 1.0, 1001)[:-1].astype(np.int64).astype(np.float32)
        mu = calculate_shift(lh * lw // p**2, sched.config.get("base_image_seq_len", 256),
                             sched.config.get("base_shift", 0.25), sched.config.get("max_shift", 0.75))
        timesteps, _ = retrieve_timesteps(sched, 1000, "cpu", ts, ts / sched.config.num_train_timesteps, mu=mu)
        sigma = sched.sigmas[d.t_index[k]]
        noise = d.noise[k: k + 1]
        xt = sigma * noise + (1 - sigma) * x0
        tokens, glyphs = conds[i]
        pred = model(hidden_states=xt, encoder_hidden_states=glyphs[None], prior_token_id=tokens,
                     prior_token_drop=torch.zeros_like(tokens, dtype=torch.bool),
                     timestep=timesteps[d.t_index[k]].expand(1) - 1,
                     target_size=torch.tensor([[lh * 8, lw * 8]], dtype=torch.float32),
                     crop_coords=torch.zeros((1, 2)), return_dict=False)[0]
        losses.append(((pred - (noise - x0)) ** 2).mean())
    loss = torch.stack(losses).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return peft_factors(model, init), loss.item()


def test_glm_one_step_matches_diffusers_peft_and_adamw(glm_setup, models_dir):
    s = glm_setup
    targets = training.target_layers(s["dit"].module, "all")
    init = random_init(s["dit"].module, targets, 4, 1)
    record = []
    lora = training.train(s["dit"], s["stage"].training_family(), s["latents"], s["conds"], settings(), init=init,
                          record=record)
    assert sorted(record[0].items) == [0, 1]
    ref, ref_loss = glm_reference_step(models_dir, init, s["latents"], s["conds"], record[0], 4, 2.0, 1e-2)
    assert_same_step(lora, ref, ref_loss, init)


def test_glm_loss_falls_and_the_node_trains(glm_setup, host):
    s = glm_setup
    fam = s["stage"].training_family()
    lora = training.train(s["dit"], fam, s["latents"], s["conds"], settings(steps=40, learning_rate=5e-3, rank=8,
                                                                            alpha=8.0))
    before = eval_loss(fam, s["dit"], s["latents"], s["conds"])
    after = eval_loss(fam, N["LetterpressGlmImageApplyTrainedLoRA"]().run(s["dit"], lora, 1.0)[0], s["latents"],
                      s["conds"])
    assert after < 0.8 * before, (before, after)
    ds = N["LetterpressTrainingDataset"]().run("unused", two_images(64, 96), "\n".join(GLM_CAPTIONS))[0]
    out, plot, _ = N["LetterpressGlmImageTrainLoRA"]().run(
        dit=s["dit"], ar_model=s["ar"], glyph_encoder=s["glyph"], vae=s["vae"], dataset=ds, rank=2, alpha=2.0,
        learning_rate=1e-3, steps=2, batch_size=1, seed=0, layers="attention", resolution=64,
        gradient_checkpointing=False, sample_every=2, sample_prompt="a sign that says 'OPEN'", sample_steps=2)
    assert out.family == "glm_image" and out.steps == 2 and plot.shape[0] == 1
    assert os.listdir(os.path.join(host.output_dir, "letterpress", "glm_image_samples")) == ["step000002_00001_.png"]


def test_ovis_node_trains(ovis_setup, host):
    ds = N["LetterpressTrainingDataset"]().run("unused", two_images(32, 48), "\n".join(CAPTIONS))[0]
    s = ovis_setup
    out, _, _ = N["LetterpressOvisImageTrainLoRA"]().run(
        dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds, rank=2, alpha=2.0, learning_rate=1e-3, steps=2,
        batch_size=2, seed=0, layers="mlp", resolution=32, gradient_checkpointing=True, sample_every=1,
        sample_prompt="a sign", sample_steps=2)
    assert out.family == "ovis_image" and out.steps == 2
    assert sorted(os.listdir(os.path.join(host.output_dir, "letterpress", "ovis_image_samples"))) == [
        "step000001_00001_.png", "step000002_00001_.png"]
    assert all(".ff" in t or "proj_mlp" in t for t in out.targets)
