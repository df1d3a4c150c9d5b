"""Each training setting against a reference computed independently: gradient clipping against torch's
clip_grad_norm_, accumulation against the larger batch (diffusers + PEFT + AdamW), the learning-rate schedules
against diffusers' get_scheduler and their formulas, epochs and repeats covering every image exactly so often,
caption dropout, flip and the trigger word, and the errors for bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.lora_steps import assert_same_step, random_init, settings
from letterpress.loaders.errors import LetterpressError
from letterpress.samplers import ernie_image as stage
from letterpress.samplers import lora_optim, lora_plan
from letterpress.samplers import lora_training as training
from test_lora_training import CAPTIONS, reference_step, setup, two_images  # noqa: F401 (setup: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def one_step(s, **kw):
    targets = training.target_layers(s["dit"].module, "all")
    init = random_init(s["dit"].module, targets, 4, 1)
    record = []
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"], settings(**kw), init=init,
                          record=record)
    return lora, init, record


def test_gradient_clipping_is_torchs_clip_grad_norm(setup, models_dir):
    lora, init, record = one_step(setup, max_grad_norm=0.05)
    ref, ref_loss = reference_step(models_dir, init, setup["latents"], setup["conds"], record[0], 4, 2.0, 1e-2, 3.0,
                                   clip=0.05)
    assert_same_step(lora, ref, ref_loss, init)
    unclipped, _ = reference_step(models_dir, init, setup["latents"], setup["conds"], record[0], 4, 2.0, 1e-2, 3.0)
    name = next(iter(init))
    assert (unclipped[name][1] - ref[name][1]).abs().max() > 1e-4  # the clip changed the step


def test_accumulated_batches_step_as_the_larger_batch(setup, models_dir):
    """Two accumulated batches of one: the step of one batch of both items (the mean of their losses)."""
    lora, init, record = one_step(setup, batch_size=1, gradient_accumulation=2)
    assert len(record) == 2 and sorted(record[0].items + record[1].items) == [0, 1]
    both = lora_plan.Draw(record[0].items + record[1].items, torch.cat([record[0].noise, record[1].noise]),
                          torch.cat([record[0].t_index, record[1].t_index]))
    ref, ref_loss = reference_step(models_dir, init, setup["latents"], setup["conds"], both, 4, 2.0, 1e-2, 3.0)
    assert_same_step(lora, ref, ref_loss, init)


@pytest.mark.parametrize("schedule, name", [("constant", "constant_with_warmup"), ("cosine", "cosine"),
                                            ("linear", "linear")])
def test_schedules_are_diffusers_get_scheduler_and_their_formula(schedule, name):
    from diffusers.optimization import get_scheduler

    total, warmup, lr = 20, 4, 2e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    ours = [lr * lora_optim.lr_factor(schedule, k, warmup, total) for k in range(total)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)
    after = {"constant": lambda p: 1.0, "linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}
    formula = [lr * (k / warmup if k < warmup else after[schedule]((k - warmup) / (total - warmup)))
               for k in range(total)]
    assert ours == pytest.approx(formula, rel=1e-12, abs=1e-15)


def test_a_run_steps_with_the_scheduled_rates(setup):
    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=6, batch_size=1, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2))
    assert [st["lr"] for st in lora.log.steps] == pytest.approx(
        [1e-3 * lora_optim.lr_factor("cosine", k, 2, 6) for k in range(6)], rel=1e-12)
    assert lora.log.steps[0]["lr"] == 0.0 and lora.log.steps[2]["lr"] == pytest.approx(1e-3)


def test_each_epoch_uses_every_image_its_repeats_times_in_batches_of_one_bucket(setup):
    s = setup
    wide, tall = two_images(64, 128), two_images(128, 64)
    ds = training.TrainingDataset([wide[:1], wide[1:], tall[:1], tall[1:], wide[:1]], CAPTIONS * 2 + CAPTIONS[:1],
                                  repeats=[1, 2, 1, 3, 1])
    items, table = training.prepare(ds, settings())
    latents, conds = stage.encode_dataset(s["te"], s["vae"], items, 64)
    shape = {i: tuple(latents[i].shape) for i in range(5)}
    record = []
    lora = training.train(s["dit"], stage.training_family(3.0), latents, conds,
                          settings(epochs=3, batch_size=2, gradient_accumulation=1, learning_rate=1e-4), record=record,
                          table=table)
    # wide: items 0, 1, 1, 4 -> 2 batches; tall: 2, 3, 3, 3 -> 2 batches: 4 batches an epoch, 12 steps in 3 epochs
    assert lora.steps == 12 and len(record) == 12
    for epoch in range(3):
        used = [i for d in record[4 * epoch: 4 * epoch + 4] for i in d.items]
        assert sorted(used) == [0, 1, 1, 2, 3, 3, 3, 4]
        assert all(len({shape[i] for i in d.items}) == 1 for d in record[4 * epoch: 4 * epoch + 4])
    assert [d.items for d in record[:4]] != [d.items for d in record[4:8]]  # each epoch in its own order


def test_flip_caption_dropout_and_trigger_word_make_the_variants_a_step_picks():
    images = [two_images(8, 16)[:1], two_images(8, 16)[1:]]
    items, captions, table = lora_plan.expand(images, ["a red sign", "the word [trigger] in blue"], [1, 1], True,
                                              0.25, "lpstyle")
    assert captions[:2] == ["lpstyle, a red sign", "the word lpstyle in blue"]
    for i in range(2):
        v = table.variants[i]
        assert items[v[(False, False)]] is images[i] and items[v[(False, True)]] is images[i]
        assert torch.equal(items[v[(True, False)]], torch.flip(images[i], dims=[2]))
        assert items[v[(True, True)]] is items[v[(True, False)]]
        assert captions[v[(False, True)]] == captions[v[(True, True)]] == ""
        assert captions[v[(True, False)]] == captions[i]
    latents = [torch.zeros(1, 4, 2, 2)] * len(items)
    plan = lora_plan.StepPlan(torch.Generator().manual_seed(0), latents, table, 1, 1, True, 0.25)
    picked = [plan.next_step()[0].items[0] for _ in range(2000)]
    dropped = sum(captions[i] == "" for i in picked) / len(picked)
    mirrored = sum(i in (table.variants[k][(True, d)] for k in range(2) for d in (False, True)) for i in picked)
    assert abs(dropped - 0.25) < 0.04 and abs(mirrored / len(picked) - 0.5) < 0.04
    assert lora_plan.with_trigger("", "lpstyle") == "lpstyle" and lora_plan.with_trigger("[trigger] x", "") == "x"


@pytest.mark.parametrize("change, message", [
    ({"rank": 0}, r"rank must be at least 1, got 0"),
    ({"learning_rate": 0.0}, r"learning_rate must be a positive number, got 0.0"),
    ({"learning_rate": -1e-4}, r"learning_rate must be a positive number"),
    ({"batch_size": 3}, r"batch_size 3 is larger than every resolution bucket .*2 at \(2, 2\).*Lower batch_size to 2"),
    ({"gradient_accumulation": 0}, r"gradient_accumulation must be at least 1"),
    ({"caption_dropout": 1.0}, r"caption_dropout is a probability below 1"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be 0 \(no clipping\) or more"),
    ({"warmup_steps": 5, "steps": 5}, r"warmup_steps \(5\) must be fewer than the run's 5 steps"),
    ({"lr_schedule": "step"}, r"lr_schedule must be one of constant, cosine, linear"),
    ({"optimizer": "AdamW 8-bit"}, r"needs the bitsandbytes package.*pip install bitsandbytes"),
    ({"optimizer": "Prodigy"}, r"needs the prodigyopt package.*pip install prodigyopt"),
])
def test_bad_settings_are_named_with_their_fix(setup, change, message):
    import importlib.util

    wanted = {"AdamW 8-bit": "bitsandbytes", "Prodigy": "prodigyopt"}.get(change.get("optimizer"))
    if wanted and importlib.util.find_spec(wanted) is not None:
        pytest.skip(f"{wanted} is installed here")
    s = setup
    with pytest.raises(LetterpressError, match=message):
        training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"], settings(**change))


def test_prodigy_where_installed_trains(setup):
    prodigyopt = pytest.importorskip("prodigyopt")
    opt = lora_optim.make_optimizer("Prodigy", [torch.nn.Parameter(torch.zeros(2))], 1.0)
    assert isinstance(opt, prodigyopt.Prodigy) and opt.param_groups[0]["weight_decay"] == 0.01
    s = setup
    lora = training.train(s["dit"], stage.training_family(3.0), s["latents"], s["conds"],
                          settings(steps=2, optimizer="Prodigy", learning_rate=1.0))
    assert len(lora.losses) == 2 and lora.tensors["transformer.layers.0.self_attention.to_q.lora_B.weight"].abs().max() > 0


def test_the_node_trains_epochs_of_variants_encoding_each_image_once(setup, host, monkeypatch):
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    s = setup
    encoded = []
    real = stage.encode

    def counting(vae, img):
        encoded.append(img.shape)
        return real(vae, img)

    monkeypatch.setattr(stage, "encode", counting)
    ds = training.TrainingDataset([img[None] for img in two_images(32, 48)], CAPTIONS)
    lora, _, _ = N["LetterpressErnieImageTrainLoRA"]().run(
        dit=s["dit"], text_encoder=s["te"], vae=s["vae"], dataset=ds, shift=3.0, rank=2, alpha=2.0,
        learning_rate=1e-3, steps=99, batch_size=1, seed=0, layers="attention", resolution=32,
        gradient_checkpointing=False, epochs=2, flip=True, caption_dropout=0.5, trigger_word="lpstyle")
    assert lora.steps == 4  # 2 images, batch 1, 2 epochs: `steps` is ignored
    assert len(encoded) == 4  # each image and its mirror once; the caption-dropped variants share them
