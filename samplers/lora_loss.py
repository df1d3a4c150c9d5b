"""The training loss as people read it: each optimizer step's loss and timesteps, their exponential moving average
(EMA), a JSON record, a one-line summary for the progress text and the log, the final figures for the saved file's
metadata, and the plot (raw points, the EMA over them, step and loss axes with their values)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

SMOOTHING = 0.9  # the EMA's weight on the past (TensorBoard's smoothing slider at 0.9)


def ema(values: list[float], smoothing: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average: m_k = s m_{k-1} + (1 - s) x_k from m_0 = 0, divided by 1 - s^k (so
    the first value is x_1, not (1 - s) x_1)."""
    out, m = [], 0.0
    for k, x in enumerate(values, 1):
        m = smoothing * m + (1 - smoothing) * x
        out.append(m / (1 - smoothing**k))
    return out


@dataclass
class LossLog:
    """Per optimizer step: the loss (the mean over its items and accumulated micro-batches), the timesteps its items
    were noised at (the values the DiT saw, on the family's 0..1000 scale) and the learning rate it used."""

    steps: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # what else the JSON reports (the layers trained)
    _running: tuple = field(default=(0.0, 0), repr=False)  # the EMA's m and how many steps it has folded in

    def add(self, loss: float, timesteps: list[float], lr: float, step: int | None = None) -> None:
        """Step `step` (by default the one after the last recorded)."""
        self.steps.append({"step": step or len(self.steps) + 1, "loss": loss,
                           "timesteps": [round(t, 4) for t in timesteps], "lr": lr})

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def ema(self) -> list[float]:
        return ema(self.losses)

    def summary(self) -> dict:
        """The figures a person checks at the end: steps, the last loss, its EMA, the mean and minimum."""
        losses = self.losses
        if not losses:
            return {"steps": 0}
        return {"steps": len(losses), "final_loss": losses[-1], "final_ema": self.ema()[-1],
                "mean_loss": sum(losses) / len(losses), "min_loss": min(losses)}

    def line(self, total: int) -> str:
        """'step 12/500  loss 0.2130  avg 0.1984' (avg: the EMA), for the progress text and the log."""
        if not self.steps:
            return f"step 0/{total}"
        return f"step {self.steps[-1]['step']}/{total}  loss {self.steps[-1]['loss']:.4f}  avg {self.last_ema():.4f}"

    def last_ema(self) -> float:
        """ema(self.losses)[-1], folding in only the steps added since the last call (the progress text reads it at
        every step: recomputing the whole curve each time would be quadratic in the run's length)."""
        m, k = self._running
        for s in self.steps[k:]:
            m = SMOOTHING * m + (1 - SMOOTHING) * s["loss"]
        self._running = (m, len(self.steps))
        return m / (1 - SMOOTHING ** len(self.steps))

    def to_json(self) -> str:
        return json.dumps({"smoothing": SMOOTHING, "summary": self.summary(), **self.info,
                           "steps": [{**s, "ema": e} for s, e in zip(self.steps, self.ema())]}, indent=1)

    def metadata(self) -> dict:
        """The summary as string-valued safetensors metadata (letterpress_loss_*)."""
        return {f"letterpress_loss_{k}": f"{v:.6g}" if isinstance(v, float) else str(v)
                for k, v in self.summary().items()}


# The plot ------------------------------------------------------------------------------------------------------

RAW, SMOOTH, GRID, INK = (235, 150, 150), (190, 20, 20), (225, 225, 225), (0, 0, 0)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 12) for i in range(math.ceil((hi - first) / step) + 1)]


@dataclass
class PlotBox:
    """The data area of the plot and the ranges it maps: step 1..n across, y_lo..y_hi up."""

    left: int
    top: int
    right: int
    bottom: int
    n: int
    y_lo: float
    y_hi: float

    def x(self, step: float) -> float:
        return self.left + (self.right - self.left) * ((step - 1) / max(1, self.n - 1))

    def y(self, value: float) -> float:
        return self.bottom - (self.bottom - self.top) * ((value - self.y_lo) / (self.y_hi - self.y_lo))


def plot_box(losses: list[float], width: int, height: int) -> tuple[PlotBox, list[float], list[int]]:
    """Where the points go: the box, the loss ticks (its range) and the step ticks."""
    y_ticks = nice_ticks(min(losses), max(losses))
    n = len(losses)
    x_ticks = [t for t in nice_ticks(1, max(n, 2)) if 1 <= t <= n] or [1]
    box = PlotBox(56, 22, width - 14, height - 34, n, y_ticks[0], y_ticks[-1])
    return box, y_ticks, [int(t) for t in x_ticks]


def loss_plot(losses: list[float], width: int = 640, height: int = 320) -> torch.Tensor:
    """The loss per step as an IMAGE (1, H, W, 3): the raw losses light, their EMA dark over them, gridlines at
    round loss and step values with their numbers, axis titles."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), f"training loss (light: per step, dark: EMA {SMOOTHING:.2f})", fill=INK)
    if not losses:
        d.text((width // 2 - 40, height // 2), "no steps yet", fill=INK)
    else:
        box, y_ticks, x_ticks = plot_box(losses, width, height)
        for t in y_ticks:
            y = box.y(t)
            d.line([(box.left, y), (box.right, y)], fill=GRID)
            d.text((4, y - 6), f"{t:.4g}", fill=INK)
        for t in x_ticks:
            x = box.x(t)
            d.line([(x, box.top), (x, box.bottom)], fill=GRID)
            d.text((x - 6, box.bottom + 4), str(t), fill=INK)
        d.rectangle([box.left, box.top, box.right, box.bottom], outline=(120, 120, 120))
        d.text(((box.left + box.right) // 2 - 12, height - 16), "step", fill=INK)
        _line(d, [(box.x(i + 1), box.y(v)) for i, v in enumerate(losses)], RAW, 1)
        _line(d, [(box.x(i + 1), box.y(v)) for i, v in enumerate(ema(losses))], SMOOTH, 2)
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return arr.float().div(255)[None]


def _line(d, pts: list, colour, width: int) -> None:
    if len(pts) == 1:
        x, y = pts[0]
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    else:
        d.line(pts, fill=colour, width=width)
