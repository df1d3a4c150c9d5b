"""The loss as a person reads it: the EMA (worked by hand), the axes' round values, the plot drawing the raw points
and their EMA where the axes put them, the JSON and the metadata figures."""

from __future__ import annotations

import json
import math

import torch
from letterpress.samplers import lora_loss


def test_ema_is_the_debiased_moving_average():
    # s = 0.5: m1 = 0.5*2 = 1 -> 1/(1-0.5) = 2; m2 = 0.5*1 + 0.5*4 = 2.5 -> 2.5/0.75; m3 = 1.25 + 0.5 = 1.75 -> /0.875
    assert lora_loss.ema([2.0, 4.0, 1.0], 0.5) == [2.0, 2.5 / 0.75, 1.75 / 0.875]
    assert max(abs(v - 3.0) for v in lora_loss.ema([3.0] * 50)) < 1e-12  # a constant stays itself, from step 1


def test_ticks_are_round_and_cover_the_range():
    assert lora_loss.nice_ticks(0.1, 5.5) == [0, 2, 4, 6]
    assert lora_loss.nice_ticks(0.213, 0.248) == [0.21, 0.22, 0.23, 0.24, 0.25]
    assert lora_loss.nice_ticks(1, 500) == [0, 100, 200, 300, 400, 500]


def test_plot_draws_the_ema_over_the_raw_losses_on_its_axes():
    gen = torch.Generator().manual_seed(0)
    losses = [1.0 - 0.004 * i + 0.8 * float(torch.rand(1, generator=gen)) for i in range(200)]
    img = (lora_loss.loss_plot(losses)[0] * 255).round().to(torch.uint8)
    box, y_ticks, x_ticks = lora_loss.plot_box(losses, 640, 320)
    assert y_ticks[0] <= min(losses) and y_ticks[-1] >= max(losses) and x_ticks[-1] <= 200
    smooth = torch.tensor(lora_loss.SMOOTH, dtype=torch.uint8)

    def near(x, y, colour):  # the colour within a pixel of (x, y)
        patch = img[round(y) - 1: round(y) + 2, round(x) - 1: round(x) + 2]
        return bool((patch == colour).all(-1).any())

    assert all(near(box.x(i + 1), box.y(e), smooth) for i, e in enumerate(lora_loss.ema(losses)))
    assert (img == torch.tensor(lora_loss.RAW, dtype=torch.uint8)).all(-1).sum() > 500  # the raw points, light


def test_json_and_metadata_hold_the_steps_and_the_final_figures():
    log = lora_loss.LossLog()
    for loss, t in ((0.5, [700.0]), (0.25, [12.5, 990.0]), (0.75, [300.0])):
        log.add(loss, t, 1e-4)
    data = json.loads(log.to_json())
    assert [s["loss"] for s in data["steps"]] == [0.5, 0.25, 0.75]
    assert data["steps"][1]["timesteps"] == [12.5, 990.0] and data["steps"][2]["step"] == 3
    assert [s["ema"] for s in data["steps"]] == lora_loss.ema([0.5, 0.25, 0.75])
    assert data["summary"] == {"steps": 3, "final_loss": 0.75, "final_ema": lora_loss.ema([0.5, 0.25, 0.75])[-1],
                               "mean_loss": 0.5, "min_loss": 0.25}
    meta = log.metadata()
    assert meta["letterpress_loss_steps"] == "3" and meta["letterpress_loss_final_loss"] == "0.75"
    assert math.isclose(float(meta["letterpress_loss_final_ema"]), data["summary"]["final_ema"], rel_tol=1e-5)
    assert log.line(10) == f"step 3/10  loss 0.7500  avg {data['summary']['final_ema']:.4f}"


def test_the_running_average_read_at_every_step_is_the_whole_curves_last_value():
    """The progress text reads the EMA after each step, folding in only the new steps: it equals ema() of all the
    losses so far, to the bit, whether read every step or after several."""
    log, losses = lora_loss.LossLog(), [0.9, 0.4, 1.3, 0.2, 0.7, 0.65, 0.1]
    for i, loss in enumerate(losses, 1):
        log.add(loss, [500.0], 1e-4)
        if i != 3:  # step 3 is not read: step 4 folds in two
            assert log.last_ema() == lora_loss.ema(losses[:i])[-1]
