"""Seconds per LoRA training step and peak RSS of the pack against a diffusers + PEFT + AdamW reference step, per
family, on the tiny test models (tests/fixtures), CPU.

    python benchmarks/train_step.py [--family ernie|ovis|glm|all] [--steps 20] [--rounds 3] [--threads 1]

Each (family, side) runs in its own process, so its peak RSS (ru_maxrss) is its own. Both sides train the same
layers (all Linear layers of the blocks, rank 8) on the same two cached items (the pack's encodings, batch 2), with
gradient checkpointing on both (diffusers' enable_gradient_checkpointing). Time: both sides in one process, in
alternating blocks of `--steps` steps (`--rounds` blocks each; the pack's first step of each block, which sets up
its LoRA layers and optimizer, left out), the median step of each side. Peak RSS: each side alone in its own process
(ru_maxrss). The pack side is lora_training.train's step (draw, loss through the family's
model call, backward, AdamW); the reference is the step of tests/test_lora_training*.py: diffusers' transformer with
add_adapter(LoraConfig), its own schedule, the same loss, torch.optim.AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from letterpress.loaders import families

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
KEYS = {"ernie": "ernie_image", "ovis": "ovis_image", "glm": "glm_image"}  # the registry's (loaders/families.py)


def folder(family: str) -> str:
    """The family's folder (its first folder source, under models/diffusers/), which the fixture builds."""
    return families.get(KEYS[family]).folder().name
CAPTIONS = ["a sign that says 'OPEN' in red", "a poster that says 'CLOSED NOW' in blue"]


def images(h, w):
    gen = torch.Generator().manual_seed(3)
    return torch.rand(2, h, w, 3, generator=gen)


def setup(family: str, models_dir: str):
    from letterpress.loaders.host import StandaloneHost, set_host
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    host = StandaloneHost()
    host.models_dir, host.show_progress = models_dir, False
    set_host(host)
    ds = lambda h, w: N["LetterpressTrainingDataset"]().run("unused", images(h, w), "\n".join(CAPTIONS))[0]  # noqa: E731
    if family == "ernie":
        from fixtures import ernie_image
        from letterpress.samplers import ernie_image as stage

        ernie_image.build(models_dir)
        dit, te, vae, _ = N["LetterpressErnieImageFolderLoader"]().run(folder(family), "auto", False)
        lat, conds = stage.encode_dataset(te, vae, ds(64, 64), 64)
        return dit, stage.training_family(3.0), lat, conds
    if family == "ovis":
        from fixtures import ovis_image
        from letterpress.samplers import ovis_image as stage

        ovis_image.build(models_dir)
        dit, te, vae = N["LetterpressOvisImageFolderLoader"]().run(folder(family), "auto")
        lat, conds = stage.encode_dataset(te, vae, ds(64, 64), 64, max_sequence_length=32)
        return dit, stage.training_family(), lat, conds
    from fixtures import glm_image
    from letterpress.samplers import glm_image as stage

    glm_image.build(models_dir)
    ar, glyph, dit, vae = N["LetterpressGlmImageFolderLoader"]().run(folder(family), "auto")
    lat, conds = stage.encode_dataset(ar, glyph, vae, ds(64, 64), 64)
    return dit, stage.training_family(), lat, conds


def pack_steps(dit, fam, latents, conds, n):
    from letterpress.loaders.host import get_host
    from letterpress.samplers import lora_training as training

    times = []
    listener = lambda done, total: times.append(time.perf_counter())  # noqa: E731
    get_host().progress_listeners.append(listener)
    start = time.perf_counter()
    try:
        training.train(dit, fam, latents, conds, training.TrainingSettings(
            rank=8, alpha=8.0, learning_rate=1e-4, steps=n + 1, batch_size=2, seed=0, layers="all"))
    finally:
        get_host().progress_listeners.remove(listener)
    stamps = [start] + times
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the warm-up step left out


def reference_stepper(family, models_dir, dit, latents, conds):
    """One diffusers + PEFT + AdamW training step per call (the model and optimizer kept between calls)."""
    from letterpress.samplers import lora_training as training

    targets = training.target_layers(dit.module, "all")
    transformer = os.path.join(models_dir, "diffusers", folder(family), "transformer")
    with open(os.path.join(transformer, "config.json")) as f:
        cls = json.load(f)["_class_name"]  # the DiT's diffusers class, as its folder names it
    import diffusers
    from peft import LoraConfig

    model = getattr(diffusers, cls).from_pretrained(transformer)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8.0, target_modules=targets))
    model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat(latents)
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = 3.0 * s / (1 + 2.0 * s)

    def loss_of(noise, idx):
        sigma = sigmas[idx].view(-1, 1, 1, 1)
        xt = sigma * noise + (1 - sigma) * x0
        if family == "ernie":
            text = torch.nn.utils.rnn.pad_sequence(conds, batch_first=True)
            pred = model(hidden_states=xt, timestep=sigmas[idx] * 1000, text_bth=text,
                         text_lens=torch.tensor([c.shape[0] for c in conds]), return_dict=False)[0]
            return ((pred - (noise - x0)) ** 2).mean()
        if family == "ovis":
            from diffusers import OvisImagePipeline

            b, c, h, w = x0.shape
            pack = OvisImagePipeline._pack_latents
            emb = torch.stack(conds)
            txt_ids = torch.zeros(emb.shape[1], 3)
            img_ids = OvisImagePipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
            pred = model(hidden_states=pack(xt, b, c, h, w), timestep=sigmas[idx], encoder_hidden_states=emb,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            return ((pred - pack(noise - x0, b, c, h, w)) ** 2).mean()
        parts = []
        for k, (tokens, glyphs) in enumerate(conds):
            pred = model(hidden_states=xt[k: k + 1], encoder_hidden_states=glyphs[None], prior_token_id=tokens,
                         prior_token_drop=torch.zeros_like(tokens, dtype=torch.bool),
                         timestep=(sigmas[idx[k]] * 1000).expand(1) - 1,
                         target_size=torch.tensor([[x0.shape[-2] * 8, x0.shape[-1] * 8]], dtype=torch.float32),
                         crop_coords=torch.zeros((1, 2)), return_dict=False)[0]
            parts.append(((pred - (noise[k: k + 1] - x0[k: k + 1])) ** 2).mean())
        return torch.stack(parts).mean()

    def step():
        noise = torch.randn(x0.shape, generator=gen)
        idx = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        loss = loss_of(noise, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_steps(step, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def one(family: str, side: str, steps: int, threads: int, rounds: int) -> dict:
    """side pack / reference: that side alone (for its peak RSS); side time: both in this process, in alternating
    blocks of `steps` steps (`rounds` each), so that a shared CPU's drift falls on both alike."""
    torch.set_num_threads(threads)
    models_dir = tempfile.mkdtemp()
    dit, fam, latents, conds = setup(family, models_dir)
    if side == "pack":
        pack_steps(dit, fam, latents, conds, steps)
    elif side == "reference":
        step = reference_stepper(family, models_dir, dit, latents, conds)
        reference_steps(step, steps + 1)
    else:
        step = reference_stepper(family, models_dir, dit, latents, conds)
        step()  # warm-up
        pack, ref = [], []
        for _ in range(rounds):
            pack += pack_steps(dit, fam, latents, conds, steps)
            ref += reference_steps(step, steps)
        return {"pack": statistics.median(pack), "reference": statistics.median(ref)}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="all", choices=[*KEYS, "all"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", choices=["pack", "reference", "time"])
    args = ap.parse_args()
    if args.side:
        print(json.dumps(one(args.family, args.side, args.steps, args.threads, args.rounds)))
        return
    for family in (list(KEYS) if args.family == "all" else [args.family]):
        res = {}
        for side in ("time", "pack", "reference"):
            out = subprocess.run([sys.executable, __file__, "--family", family, "--side", side, "--steps",
                                  str(args.steps), "--threads", str(args.threads), "--rounds", str(args.rounds)],
                                 capture_output=True, text=True, check=True)
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
        t, p, r = res["time"], res["pack"]["peak_rss_mb"], res["reference"]["peak_rss_mb"]
        print(f"{family}: pack {t['pack'] * 1000:.1f} ms/step, reference {t['reference'] * 1000:.1f} ms/step, ratio "
              f"{t['pack'] / t['reference']:.2f}; peak RSS pack {p:.0f} MB, reference {r:.0f} MB, ratio {p / r:.2f}")

if __name__ == "__main__":
    main()
