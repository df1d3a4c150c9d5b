"""LoRA training on the tiny ERNIE-Image: one step against diffusers' model + PEFT + torch's AdamW, the loss falling,
the saved file in diffusers' load_lora_weights, Cancel keeping the steps done, and the shipped workflow."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fixtures.lora_steps import assert_same_step, draw, peft_factors, peft_model, random_init, settings

from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.samplers import ernie_image as stage
from letterpress.samplers import lora_training as training
from letterpress.samplers.lora_plan import ItemTable, StepPlan

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a poster that says OPEN in red", "a sign with the word CLOSED in blue"]


def node(name):
    return N["LetterpressErnieImage" + name]()


def two_images(h=32, w=32):
    gen = torch.Generator().manual_seed(3)
    base = torch.linspace(0, 1, w).view(1, 1, w, 1).expand(2, h, w, 3).clone()
    return (0.5 * base + 0.5 * torch.rand(2, h, w, 3, generator=gen)).clamp(0, 1)


@pytest.fixture(scope="module")
def setup(ernie, models_dir):
    dit, te, vae, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    ds = N["LetterpressTrainingDataset"]().run("unused", two_images(), "\n".join(CAPTIONS))[0]
    latents, conds = stage.encode_dataset(te, vae, ds, 32)
    return dict(dit=dit, te=te, vae=vae, ds=ds, latents=latents, conds=conds)


def reference_step(models_dir, init, latents, conds, d, rank, alpha, lr, shift, weights=None, clip=0.0):
    """One step written with the libraries: diffusers' ErnieImageTransformer2DModel with a PEFT LoRA (add_adapter),
    flow matching as DiffSynth-Studio trains ERNIE-Image (its shifted 1000-step schedule and timestep weight,
    computed here from its formulas), torch's AdamW; with `clip`, torch's clip_grad_norm_ before the step."""
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image", "transformer"))
    if weights is not None:  # another base (a quantized file's weights, dequantized)
        missing = model.load_state_dict(weights, strict=False)
        assert not missing.unexpected_keys
    model, params = peft_model(model, init, rank, alpha)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    timesteps = sigmas * 1000
    y = torch.exp(-2 * ((timesteps.double() - 500) / 1000) ** 2)
    weights = (y - y.min()) * (1000 / (y - y.min()).sum())
    x0 = torch.cat([latents[i] for i in d.items])
    sigma = sigmas[d.t_index].view(-1, 1, 1, 1)
    xt = sigma * d.noise + (1 - sigma) * x0
    hs = [conds[i] for i in d.items]
    text = torch.zeros(len(hs), max(h.shape[0] for h in hs), hs[0].shape[1])
    for i, h in enumerate(hs):
        text[i, : h.shape[0]] = h
    lens = torch.tensor([h.shape[0] for h in hs])
    pred = model(hidden_states=xt, timestep=timesteps[d.t_index], text_bth=text, text_lens=lens, return_dict=False)[0]
    per_item = ((pred.float() - (d.noise - x0)) ** 2).mean(dim=(1, 2, 3)) * weights[d.t_index].float()
    loss = per_item.mean()
    opt.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return peft_factors(model, init), loss.item()


def test_one_step_matches_diffusers_peft_and_adamw(setup, models_dir):
    s = setup
    targets = training.target_layers(s["dit"].module, "all")
    assert "layers.0.self_attention.to_q" in targets and "layers.1.mlp.linear_fc2" in targets
    init = random_init(s["dit"].module, targets, 4, 1)
    record = []
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"], settings(), init=init,
                          record=record)
    assert len(record) == 1 and sorted(record[0].items) == [0, 1]
    ref, ref_loss = reference_step(models_dir, init, s["latents"], s["conds"], record[0], 4, 2.0, 1e-2, 3.0)
    assert_same_step(lora, ref, ref_loss, init)


def test_loss_output_holds_the_losses_and_timesteps_the_steps_computed(setup, host):
    """The node's loss_log JSON: each step's loss is the one the step computed (step 1: the diffusers + PEFT
    reference's), its timesteps those the items were noised at (DiffSynth-Studio's shifted schedule at the drawn
    indices); the progress text and the saved file's metadata carry the running average and the final figures."""
    from safetensors import safe_open

    s = setup
    record, texts = [], []
    fam = stage.training_family(3.0)
    original = host.progress

    def progress(total):  # the host's bar, its text lines kept
        bar = original(total)
        show = bar.text
        bar.text = lambda message: (texts.append(message), show(message))
        return bar

    host.progress = progress
    lora = training.train(s["dit"], fam, s["latents"], s["conds"], settings(steps=3, batch_size=1), record=record)
    data = json.loads(lora.log.to_json())
    assert [st["loss"] for st in data["steps"]] == lora.losses and len(lora.losses) == 3
    shifted = 3.0 * torch.linspace(1.0, 0.0, 1001)[:-1] / (1 + 2.0 * torch.linspace(1.0, 0.0, 1001)[:-1])
    for st, d in zip(data["steps"], record):
        assert st["timesteps"] == pytest.approx([float(shifted[i]) * 1000 for i in d.t_index], abs=1e-3)
    with torch.no_grad():  # step 1's loss, recomputed from the draw on the untrained LoRA (B = 0: the bare DiT)
        first = training.flow_matching_loss(fam, s["dit"], s["dit"].module, s["latents"], s["conds"], record[0])
    assert abs(data["steps"][0]["loss"] - first.item()) <= 1e-6
    ema = [st["ema"] for st in data["steps"]]
    assert texts[0] == "training 14 layers, 8,704 LoRA parameters (layers / parameters: attention 8 / 4,096; mlp 6 / " \
                       "4,608; all 14 / 8,704)"  # rank 4 on the tiny DiT: 4 x (64 + 64) per attention projection
    assert texts[1:] == [f"step {k + 1}/3  loss {lora.losses[k]:.4f}  avg {ema[k]:.4f}" for k in range(3)]
    assert json.loads(lora.log.to_json())["layers"]["trained"] == {"layers": 14, "parameters": 8704}
    path = N["LetterpressSaveLoRA"]().run(lora, "loras/with_loss")["result"][0]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert float(meta["letterpress_loss_final_loss"]) == pytest.approx(lora.losses[-1], rel=1e-5)
    assert float(meta["letterpress_loss_final_ema"]) == pytest.approx(ema[-1], rel=1e-5)


def test_attention_and_mlp_layer_choices(setup):
    module = setup["dit"].module
    att, mlp = training.target_layers(module, "attention"), training.target_layers(module, "mlp")
    assert att == [f"layers.{i}.self_attention.{p}" for i in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert mlp == [f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "linear_fc2")]


def _eval_loss(dit, latents, conds):
    """The mean training loss on fixed draws (their own seed), with whatever LoRA the handle carries."""
    from letterpress.loaders.host import get_host

    get_host().load(dit)
    gen = torch.Generator().manual_seed(123)
    draws = [draw(gen, latents, 2) for _ in range(12)]
    with torch.no_grad():
        return sum(training.flow_matching_loss(stage.training_family(3.0), dit, dit.module, latents, conds, d).item()
                   for d in draws) / len(draws)


def test_loss_falls_and_the_trained_lora_applies_like_its_file(setup, models_dir, host):
    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=40, learning_rate=5e-3, rank=8, alpha=8.0, layers="all"))
    assert lora.steps == 40 and len(lora.losses) == 40
    before = _eval_loss(s["dit"], s["latents"], s["conds"])
    trained = node("ApplyTrainedLoRA").run(s["dit"], lora, 1.0)[0]
    after = _eval_loss(trained, s["latents"], s["conds"])
    assert after < 0.8 * before, (before, after)
    # Saved, then loaded back by the LoRA Loader: the same DiT patches
    path = N["LetterpressSaveLoRA"]().run(lora, "loras/trained")["result"][0]
    assert path.endswith("trained_00001_.safetensors")
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    import shutil

    shutil.copy(path, os.path.join(models_dir, "loras", "trained_ernie.safetensors"))
    from_file = node("LoraLoader").run(s["dit"], "trained_ernie.safetensors", 1.0)[0]
    assert _eval_loss(from_file, s["latents"], s["conds"]) == after
    plot = training.loss_plot(lora.losses)
    assert plot.shape == (1, 320, 640, 3) and plot.std() > 0.01


def test_saved_file_loads_in_diffusers_and_draws_what_the_lora_loader_draws(setup, models_dir, host):
    from diffusers import ErnieImagePipeline
    from safetensors import safe_open

    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=3, learning_rate=5e-2, rank=4, alpha=8.0, layers="attention"))
    folder = os.path.join(models_dir, "loras")
    os.makedirs(folder, exist_ok=True)
    lora.save(os.path.join(folder, "trained_for_diffusers.safetensors"))
    with safe_open(os.path.join(folder, "trained_for_diffusers.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0
    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(os.path.join(folder, "trained_for_diffusers.safetensors"), adapter_name="t")
    prompt = CAPTIONS[0]
    ref = torch.from_numpy(pipe(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                                generator=torch.Generator("cpu").manual_seed(4), output_type="np", use_pe=False).images)
    pipe.unload_lora_weights()
    base_ref = torch.from_numpy(pipe(prompt, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                                     generator=torch.Generator("cpu").manual_seed(4), output_type="np",
                                     use_pe=False).images)

    def ours(dit):
        pos = node("TextEncode").run(s["te"], prompt)[0]
        lat = node("EmptyLatent").run(32, 32, 1)[0]
        return node("VAEDecode").run(s["vae"], node("Sampler").run(dit, pos, lat, 4, 2, 1.0, 4.0, 1.0)[0])[0]

    got = ours(node("LoraLoader").run(s["dit"], "trained_for_diffusers.safetensors", 1.0)[0])
    assert (ref - base_ref).abs().max() > 1e-3  # the trained LoRA changes the image
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours(node("ApplyTrainedLoRA").run(s["dit"], lora, 1.0)[0]), got)


def test_saved_loras_are_listed_by_the_lora_loader_where_they_are_and_never_replace_a_file(setup, host, models_dir):
    """output/loras is a LoRA folder: Save LoRA's file is in the LoRA Loader's list and loads by that name, unmoved;
    the number follows the highest in any LoRA folder (models/loras too), so no file is replaced and no name is
    shared."""
    from safetensors.torch import save_file

    from letterpress.loaders.files import list_files

    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=1, layers="attention"))
    os.makedirs(os.path.join(models_dir, "loras", "mine"), exist_ok=True)
    taken = os.path.join(models_dir, "loras", "mine", "style_00002_.safetensors")
    save_file({"x": torch.zeros(1)}, taken)
    save = N["LetterpressSaveLoRA"]()
    first = save.run(lora, "loras/mine/style")
    second = save.run(lora, "loras/mine/style")["result"][0]
    try:
        assert first["result"][0] == os.path.join(host.output_dir, "loras", "mine", "style_00003_.safetensors")
        assert second == os.path.join(host.output_dir, "loras", "mine", "style_00004_.safetensors")
        assert first["ui"]["text"][0].endswith("LoRA Loader: mine/style_00003_.safetensors")
        assert {"mine/style_00002_.safetensors", "mine/style_00003_.safetensors",
                "mine/style_00004_.safetensors"} <= set(list_files("loras"))
        loaded = node("LoraLoader").run(s["dit"], "mine/style_00004_.safetensors", 1.0)[0]
        assert _eval_loss(loaded, s["latents"], s["conds"]) == _eval_loss(
            node("ApplyTrainedLoRA").run(s["dit"], lora, 1.0)[0], s["latents"], s["conds"])
        outside = save.run(lora, "elsewhere/style")
        assert "Not in a LoRA folder: start filename_prefix with loras/" in outside["ui"]["text"][0]
    finally:
        os.remove(taken)


def test_cancel_at_step_k_keeps_a_lora_of_the_steps_done(setup, host):
    from letterpress.loaders.errors import Interrupted

    s = setup
    k = 3

    def stop_at(done, total):
        if done == k:
            host.request_interrupt()

    host.progress_listeners.append(stop_at)
    kept = []
    with pytest.raises(Interrupted):
        training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"], settings(steps=10, seed=5),
                       on_cancel=kept.append)
    host.progress_listeners.remove(stop_at)
    assert len(kept) == 1 and kept[0].steps == k
    full = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"], settings(steps=k, seed=5))
    for key, t in full.tensors.items():
        assert torch.equal(kept[0].tensors[key], t), key
    assert not any(p.requires_grad for p in s["dit"].module.parameters())
    assert not s["dit"].module._forward_hooks and all(not m._forward_hooks for m in s["dit"].module.modules())


def test_train_node_caches_and_saves_on_cancel(setup, host):
    """The node path: dataset from a folder under the input folder, the loss plot, and the cancelled LoRA's file."""
    from PIL import Image

    from letterpress.loaders.errors import Interrupted

    s = setup
    folder = os.path.join(host.input_dir, "ds")
    os.makedirs(folder)
    for i, (img, cap) in enumerate(zip(two_images(32, 48), CAPTIONS)):
        Image.fromarray((img.numpy() * 255).astype("uint8")).save(os.path.join(folder, f"{i}.png"))
        open(os.path.join(folder, f"{i}.txt"), "w").write(cap)
    ds = N["LetterpressTrainingDataset"]().run("ds")[0]
    assert ds.captions == CAPTIONS and ds.images[0].shape == (1, 32, 48, 3)
    widgets = dict(rank=2, alpha=2.0, learning_rate=1e-3, steps=2, batch_size=1, seed=0, layers="attention",
                   resolution=32, gradient_checkpointing=False)
    lora, plot, loss_log = node("TrainLoRA").run(dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds,
                                                 shift=3.0, **widgets)
    assert lora.steps == 2 and plot.shape[-1] == 3
    assert [st["loss"] for st in json.loads(loss_log)["steps"]] == lora.losses
    host.progress_listeners.append(lambda done, total: host.request_interrupt() if done == 1 else None)
    with pytest.raises(Interrupted):
        node("TrainLoRA").run(dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds, shift=3.0, **{**widgets, "steps": 5})
    saved = sorted(os.listdir(os.path.join(host.output_dir, "loras")))  # the LoRA and its optimizer state
    assert saved == ["ernie_image_cancelled_step1_00001_.safetensors", "ernie_image_cancelled_step1_00001_.training_state"]


def write_dataset(folder, h=32, w=48):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, (img, cap) in enumerate(zip(two_images(h, w), CAPTIONS)):
        Image.fromarray((img.numpy() * 255).astype("uint8")).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(cap)


def test_shipped_training_workflow_runs_headless(setup, host, tmp_path):
    """dataset -> Train LoRA -> Save LoRA, the loss plot, and the LoRA into a sampler for a preview image."""
    from letterpress.runner import Runner, load_workflow, set_values

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wf = load_workflow(os.path.join(root, "workflows", "api", "ernie_image_train_lora_api.json"))
    write_dataset(os.path.join(host.input_dir, wf["2"]["inputs"]["folder"]))
    wf = set_values(wf, ["3.steps=3", "10.steps=2", "resolution=32", "width=32", "height=32", "rank=2"])
    results = Runner().run(wf)["results"]
    lora = results["3"][0]
    assert lora.steps == 3 and lora.rank == 2
    saved = sorted(os.listdir(os.path.join(host.output_dir, "loras")))
    assert saved == ["ernie_image_lora_00001_.safetensors", "ernie_image_lora_00001_.training_state"]
    assert results["11"][0].shape == (1, 32, 32, 3)
    assert os.listdir(os.path.join(host.output_dir, "letterpress")) == ["ernie_image_train_lora_00001_.png"]


def test_qlora_on_a_quantized_dit_matches_peft_on_its_dequantized_weights(setup, shipped_models, models_dir):
    """A GGUF (Q4_0) DiT trains with its weights kept packed, dequantized per layer at each call (QLoRA): the step
    equals the PEFT reference on a model holding those dequantized weights, and the packed bytes are unchanged."""
    from letterpress.loaders import layers

    s = setup
    dit = node("DiTLoader").run("ernie-image-turbo-Q4_K_M.gguf", "auto")[0]
    packed = {n: m for n, m in dit.module.named_modules() if layers.is_packed(m)}
    assert "layers.0.self_attention.to_q" in packed
    before = {n: m.weight.detach().clone() for n, m in packed.items()}
    dequantized = {f"{n}.weight": layers.dequantized_weight(m) for n, m in packed.items()}
    targets = training.target_layers(dit.module, "attention")
    init = random_init(dit.module, targets, 4, 2)
    record = []
    lora = training.train(dit, stage.training_family(3.0), s["latents"], s["conds"], settings(layers="attention"),
                          init=init, record=record)
    ref, ref_loss = reference_step(models_dir, init, s["latents"], s["conds"], record[0], 4, 2.0, 1e-2, 3.0,
                                   weights=dequantized)
    assert_same_step(lora, ref, ref_loss, init)
    assert all(torch.equal(m.weight, before[n]) for n, m in packed.items())


def test_fp8_stored_dit_trains_and_keeps_its_weights(setup):
    s = setup
    dit = node("DiTLoader").run("ernie-image.safetensors", "fp8_e4m3fn")[0]
    w = dit.module.get_submodule("layers.0.self_attention.to_q").weight
    assert w.dtype == torch.float8_e4m3fn
    before = w.detach().clone()
    lora = training.train(dit, stage.training_family(3.0), s["latents"], s["conds"], settings(steps=2))
    assert len(lora.losses) == 2 and all(torch.isfinite(torch.tensor(lora.losses)))
    assert lora.tensors["transformer.layers.0.self_attention.to_q.lora_B.weight"].abs().max() > 0
    assert torch.equal(dit.module.get_submodule("layers.0.self_attention.to_q").weight.view(torch.uint8),
                       before.view(torch.uint8))


def test_resolution_buckets_keep_the_aspect_ratio_and_batches_stay_in_one_bucket(setup):
    w, h = training.bucket_size(1536, 1024, 1024, 16)
    assert (w % 16, h % 16) == (0, 0) and abs(w / h - 1.5) < 0.01 and abs(w * h / 1024**2 - 1) < 0.03
    assert training.bucket_size(1024, 1536, 1024, 16) == (h, w)
    s = setup
    wide, tall = two_images(64, 128), two_images(128, 64)
    ds = training.TrainingDataset([wide[:1], wide[1:], tall[:1], tall[1:]], CAPTIONS * 2)
    latents, conds = stage.encode_dataset(s["te"], s["vae"], ds, 64)
    assert [tuple(lat.shape[-2:]) for lat in latents] == [(3, 6), (3, 6), (6, 3), (6, 3)]  # 48x96 and 96x48, uncropped
    plan = StepPlan(torch.Generator().manual_seed(0), latents, ItemTable.plain(4), 2, 1, False, 0.0)
    for _ in range(20):  # ten epochs of two batches: each batch the two images of one bucket
        (d,) = plan.next_step()
        assert len({tuple(latents[i].shape) for i in d.items}) == 1 and len(d.items) == 2
    lora = training.train(s["dit"], stage.training_family(3.0), latents, conds, settings(steps=3, batch_size=2))
    assert len(lora.losses) == 3


def test_diffsynth_format_holds_the_same_lora(setup, models_dir):
    """Saved in DiffSynth-Studio's naming (its loader adds B @ A unscaled: alpha / rank folded into B), the file
    gives the LoRA Loader the same deltas as the diffusers/PEFT file."""
    from letterpress.loaders.lora import read_lora

    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=2, rank=4, alpha=8.0, layers="attention"))
    folder = os.path.join(models_dir, "loras")
    path = N["LetterpressSaveLoRA"]().run(lora, "ds_format", "DiffSynth-Studio")["result"][0]
    ds = read_lora(path)
    assert ds.format == "DiffSynth-Studio"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert "layers.0.self_attention.to_q.lora_A.default.weight" in f.keys()
    peft = lora.weights()
    assert set(ds.layers) == set(peft.layers)
    for name in peft.layers:
        assert (ds.delta(name) - peft.delta(name)).abs().max().item() <= 1e-6
