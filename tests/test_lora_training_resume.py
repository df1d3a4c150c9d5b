"""Checkpoints and resume: a LoRA saved at step N and resumed to step M equals the uninterrupted run to M (its
optimizer state, schedule position and the run's choices carried over); the node keeps the last K checkpoints,
listed by the LoRA Loader; a resume with other settings is refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from fixtures.lora_steps import settings
from test_lora_training import setup  # noqa: F401 (the fixture)

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.samplers import ernie_image as stage
from letterpress.samplers import lora_resume
from letterpress.samplers import lora_training as training

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(steps=6, batch_size=1, learning_rate=5e-3, lr_schedule="cosine", warmup_steps=1, max_grad_norm=0.5,
           layers="attention", flip=False)


def test_a_checkpoint_resumed_to_m_steps_equals_the_run_to_m(setup, tmp_path):
    s = setup
    fam = stage.training_family(3.0)
    saved = {}

    def at_3(step, snapshot):  # the checkpoint of step 3 of the 6-step run
        if step == 3:
            path = str(tmp_path / "at3.safetensors")
            snapshot().save(path)
            saved["path"] = path

    full = training.train(s["dit"], fam, s["latents"], s["conds"], settings(**RUN), on_step=at_3)
    assert os.path.isfile(lora_resume.state_path(saved["path"]))
    resume = lora_resume.load(saved["path"], "ernie_image")
    assert resume.step == 3 and resume.optimizer is not None and len(resume.log) == 3
    resumed = training.train(s["dit"], fam, s["latents"], s["conds"], settings(**RUN), resume=resume)
    assert resumed.steps == 6 and [st["step"] for st in resumed.log.steps] == [1, 2, 3, 4, 5, 6]
    assert resumed.losses == full.losses
    for key, t in full.tensors.items():
        assert torch.equal(resumed.tensors[key], t), key
    # Without the optimizer state AdamW restarts its moments: no longer the same run (the side file matters)
    os.remove(lora_resume.state_path(saved["path"]))
    fresh = training.train(s["dit"], fam, s["latents"], s["conds"], settings(**RUN),
                           resume=lora_resume.load(saved["path"], "ernie_image"))
    key = "transformer.layers.0.self_attention.to_q.lora_B.weight"
    assert not torch.equal(fresh.tensors[key], full.tensors[key])


def test_a_resume_with_other_settings_is_refused(setup, tmp_path):
    s = setup
    fam = stage.training_family(3.0)
    lora = training.train(s["dit"], fam, s["latents"], s["conds"], settings(**{**RUN, "steps": 2}))
    path = str(tmp_path / "two.safetensors")
    lora.save(path)
    with pytest.raises(LetterpressError, match=r"trained at rank 4, alpha 2; this run asks for rank 8, alpha 2"):
        training.train(s["dit"], fam, s["latents"], s["conds"], settings(**{**RUN, "rank": 8}),
                       resume=lora_resume.load(path, "ernie_image"))
    with pytest.raises(LetterpressError, match=r"trains 8 layers, this run's layers / target_modules pick 14"):
        training.train(s["dit"], fam, s["latents"], s["conds"], settings(**{**RUN, "layers": "all"}),
                       resume=lora_resume.load(path, "ernie_image"))
    with pytest.raises(LetterpressError, match=r"has done 2 steps already; this run has 2"):
        training.train(s["dit"], fam, s["latents"], s["conds"], settings(**{**RUN, "steps": 2}),
                       resume=lora_resume.load(path, "ernie_image"))
    with pytest.raises(LetterpressError, match=r"is not a ovis_image LoRA saved by Train LoRA"):
        lora_resume.load(path, "ovis_image")


def test_the_node_keeps_the_last_checkpoints_and_resumes_from_one(setup, host):
    from letterpress.loaders.files import list_files

    s = setup
    ds = N["LetterpressTrainingDataset"]().run("unused", torch.rand(2, 32, 32, 3), "one\ntwo")[0]
    widgets = dict(rank=2, alpha=2.0, learning_rate=1e-3, steps=6, batch_size=1, seed=0, layers="attention",
                   resolution=32, gradient_checkpointing=False)
    trainer = dict(target_modules="", epochs=0, gradient_accumulation=1, max_grad_norm=1.0, optimizer="AdamW",
                   lr_schedule="linear", warmup_steps=2, caption_dropout=0.0, flip=False, trigger_word="")
    progress = dict(sample_every=0, sample_prompt="", sample_steps=2, save_every=2, keep_last=2, resume_from="none")
    options = N["LetterpressLoRATrainingCheckpoints"]().run(
        N["LetterpressLoRATrainingOptions"]().run(**trainer)[0], **progress)[0]  # the two option nodes chained
    assert options == {**trainer, **progress}
    node = N["LetterpressErnieImageTrainLoRA"]()
    full = node.run(dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds, shift=3.0, options=options,
                    **widgets)[0]
    assert [st["lr"] for st in full.log.steps][:3] == [0.0, 5e-4, 1e-3]  # the options' warmup reached the run
    folder = os.path.join(host.output_dir, "loras", "ernie_image_checkpoints")
    assert sorted(os.listdir(folder)) == [f"ernie_image_step00000{n}_00001_.{ext}" for n in (4, 6)
                                          for ext in ("safetensors", "training_state")]
    name = "ernie_image_checkpoints/ernie_image_step000004_00001_.safetensors"
    assert name in list_files("loras")
    resumed = node.run(dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds, shift=3.0,
                       options={**options, "save_every": 0, "resume_from": name}, **widgets)[0]
    for key, t in full.tensors.items():
        assert torch.equal(resumed.tensors[key], t), key


def test_samples_are_what_the_lora_of_their_step_draws_and_show_as_the_preview(setup, host):
    """sample_every 2 of 4 steps: each sample equals DiT Sample with that step's checkpoint applied (same prompt,
    seed, size and steps), is saved under output/letterpress/, and is the preview the node's bar shows."""
    import numpy as np
    from PIL import Image

    s = setup
    shown = []
    original = host.progress

    def progress(total):
        bar = original(total)
        update = bar.update
        bar.update = lambda n=1, preview=None: (shown.append(preview) if preview is not None else None,
                                                update(n, preview))
        return bar

    host.progress = progress
    ds = N["LetterpressTrainingDataset"]().run("unused", torch.rand(2, 32, 32, 3), "one\ntwo")[0]
    widgets = dict(rank=2, alpha=2.0, learning_rate=5e-2, steps=4, batch_size=1, seed=3, layers="attention",
                   resolution=32, gradient_checkpointing=True, save_every=2, keep_last=0, sample_every=2,
                   sample_prompt="a sign that says OPEN", sample_steps=2)
    N["LetterpressErnieImageTrainLoRA"]().run(dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds,
                                              shift=3.0, **widgets)
    folder = os.path.join(host.output_dir, "letterpress", "ernie_image_samples")
    assert sorted(os.listdir(folder)) == ["step000002_00001_.png", "step000004_00001_.png"] and len(shown) == 2
    pos = N["LetterpressErnieImageTextEncode"]().run(s["te"], "a sign that says OPEN")[0]
    neg = N["LetterpressErnieImageTextEncode"]().run(s["te"], "")[0]
    latent = N["LetterpressErnieImageEmptyLatent"]().run(32, 32, 1)[0]
    for k, step in enumerate((2, 4)):
        path = os.path.join(host.output_dir, "loras", "ernie_image_checkpoints",
                            f"ernie_image_step{step:06}_00001_.safetensors")
        lora = lora_resume.load(path, "ernie_image")
        trained = training.TrainedLora("ernie_image", {f"transformer.{n}.lora_{s_}.weight": t
                                                       for n, (a, b) in lora.factors.items()
                                                       for s_, t in (("A", a), ("B", b))}, 2, 2.0, lora.targets, step)
        dit = N["LetterpressErnieImageApplyTrainedLoRA"]().run(s["dit"], trained, 1.0)[0]
        out = N["LetterpressErnieImageSampler"]().run(dit, pos, latent, 3, 2, 4.0, 4.0, 1.0, neg)[0]
        ref = (N["LetterpressErnieImageVAEDecode"]().run(s["vae"], out)[0][0] * 255).round()
        saved = torch.from_numpy(np.asarray(Image.open(os.path.join(folder, f"step{step:06}_00001_.png")))).float()
        assert (saved - ref).abs().max() <= 1, step
        assert torch.equal(torch.from_numpy(np.asarray(shown[k])).float(), saved)
    assert (saved - torch.from_numpy(np.asarray(Image.open(os.path.join(folder, "step000002_00001_.png"))))
            .float()).abs().max() > 2  # the LoRA changed between the samples
