"""The one flow sampler of the image families, and the hooks a family gives it (`FlowModel`).

A family's samplers/<key>.py declares one `FLOW = FlowModel(...)`: its DiT inputs, its model call, its schedule, its
CFG mode, its latent <-> DiT layout and its preview. `sample()` here owns the rest: the noise, the start point for
denoise < 1, the inpainting mask, CFG, the Euler steps with progress, Cancel and previews (flow_match.euler_loop),
the finite check. LoRA training (lora_training.train, through `Training`) takes its model call, layout and timesteps from the same
object: `FLOW.schedule` at 1000 steps is the training schedule, so sampling and training never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..loaders import compiled, families
from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle
from . import flow_match, working_memory
from .numerics import check_finite
from .previews import latent_rgb_preview

BATCHED = "batched"  # CFG as one call on the batch [uncond, cond]
TWO_PASSES = "two passes"  # CFG as a cond call, then an uncond call


def _same(x: torch.Tensor, *shape) -> torch.Tensor:
    return x


def _rows(cond: torch.Tensor) -> int:
    return cond.shape[0]


@dataclass(frozen=True)
class FlowModel:
    """A family's part of flow sampling and LoRA training. Shapes named `shape` are the LATENT's (B, C, H, W).

    - `inputs(dit, conds, shape)`: the DiT's inputs besides x and t for a batch of per-item conditionings;
    - `velocity(run, x, t, inputs)`: the one model call (run: the module or its compiled form; t one per item);
    - `schedule(dit, steps, shape, **options)`: (sigmas with the terminal 0, timesteps) of a `steps`-step run;
    - `cfg`: BATCHED or TWO_PASSES; `uncond(inputs)`: what else the unconditional pass changes (prior tokens
      dropped, a cache skipped: None when it differs only by its negative conditioning);
    - `to_model(latents)` / `from_model(x, shape)`: the latent <-> the DiT's layout (tokens, patches);
    - `mask(noise_mask, shape, device)`: an inpainting mask on the latent grid (B, C, H, W);
    - `preview(latents)`: the live preview of an x0 estimate;
    - `sequence(dit, shape)`: (the DiT's image tokens for one latent, its width), and `text_tokens(cond)`: the text
      tokens of one encoded conditioning (its rows by default): the size of its activations (`memory`,
      `train_memory`) for the host;
    - training: `loss_weight(timesteps)` (None: plain MSE), `one_at_a_time` (the DiT takes one item per call)."""

    family: str  # its registry key
    inputs: Callable
    velocity: Callable
    schedule: Callable
    sequence: Callable
    cfg: str = TWO_PASSES
    uncond: Callable | None = None
    to_model: Callable = _same
    from_model: Callable = _same
    mask: Callable = flow_match.inpaint_mask
    preview: Callable = latent_rgb_preview
    text_tokens: Callable = _rows
    loss_weight: Callable | None = None
    one_at_a_time: bool = False

    def memory(self, dit: ModelHandle, batch: int, shape, text_tokens: int) -> int:
        """Bytes of activations of one DiT forward over `batch` latents of `shape`, each with `text_tokens` text
        tokens (working_memory.dit at the family's factor): what the host makes room for before a sampler runs."""
        tokens, width = self.sequence(dit, shape)
        return working_memory.dit(dit, batch, tokens + text_tokens, width)

    def train_memory(self, dit: ModelHandle, batch: int, shape, conds: list) -> int:
        """Bytes a training step keeps for backward (twice a forward's activations) over `batch` items of `shape`
        with the encoded conditionings `conds` (one item per call when `one_at_a_time`)."""
        text = max(self.text_tokens(c) for c in conds)
        return 2 * self.memory(dit, 1 if self.one_at_a_time else batch, shape, text)

    def training(self, **options) -> "Training":
        """The training objective for lora_training.train: this object, with the run's schedule options."""
        return Training(self, options)

    def training_schedule(self, dit: ModelHandle, shape, **options):
        """The 1000 (sigma, timestep) pairs training draws from uniformly: the sampler's schedule at 1000 steps."""
        sigmas, timesteps = self.schedule(dit, 1000, shape, **options)
        return sigmas[:-1], timesteps


@dataclass(frozen=True)
class Training:
    """What LoRA training (lora_training.train) needs from a family: its FlowModel (the sampler's DiT inputs, model
    call, latent layout and schedule, whose 1000-step form training draws its timesteps from, its `train_memory`,
    plus its training hooks `loss_weight` and `one_at_a_time`) and the schedule options of the run (a static shift,
    say)."""

    flow: FlowModel
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.flow.family


def check_steps(steps: int) -> None:
    if steps < 1:
        raise LetterpressError(f"steps must be at least 1, got {steps} (a run of {steps} steps runs no step).")


@torch.no_grad()
def sample(flow: FlowModel, dit: ModelHandle, positive: list, negative: list | None, cfg: float, seed: int,
           steps: int, init: torch.Tensor | None = None, shape: tuple | None = None, denoise: float = 1.0,
           noise_mask: torch.Tensor | None = None, extra_inputs: dict | None = None, **options) -> torch.Tensor:
    """Denoise from noise (`shape`) or from the latents `init` (denoise < 1, inpainting with `noise_mask`); the
    per-item conditionings `positive` and `negative` (None: no CFG pass) go through `flow.inputs`, with
    `extra_inputs` added to each pass's. `options` go to the schedule. Returns the latents (on the CPU)."""
    check_steps(steps)
    device, dtype = dit.device, dit.dtype
    run = compiled.forward(dit)  # the module, or its compiled form (Torch Compile node)
    shape = tuple(init.shape) if init is not None else tuple(shape)
    use_cfg = negative is not None
    extra = extra_inputs or {}

    def inputs_of(conds: list) -> dict:
        return {**flow.inputs(dit, conds, shape), **extra}

    if flow.cfg == BATCHED:
        cond, uncond = inputs_of((negative if use_cfg else []) + positive), None
    else:
        cond = inputs_of(positive)
        uncond = inputs_of(negative) if use_cfg else None
        if uncond is not None and flow.uncond is not None:
            uncond = flow.uncond(uncond)

    sigmas, timesteps = flow.schedule(dit, steps, shape, **options)
    timesteps = timesteps.to(device)
    first = flow_match.start_index(steps, denoise)
    noise = flow_match.noise_like(shape, seed, dtype, device)
    x = flow_match.start_latents(noise, init.to(device) if init is not None and denoise < 1.0 else None,
                                 float(sigmas[first]))
    x = flow.to_model(x)
    blend = None
    if noise_mask is not None:  # inpainting: redraw the masked area only
        mask = flow.mask(noise_mask, shape, device)
        blend = flow_match.keep_unmasked(*(flow.to_model(t) for t in (mask, init.to(device), noise)))

    def predict(x: torch.Tensor, i: int) -> torch.Tensor:
        x = x.to(dtype)
        if flow.cfg == BATCHED:
            xin = torch.cat([x, x]) if use_cfg else x
            v = flow.velocity(run, xin, timesteps[i].expand(xin.shape[0]), cond)
            return flow_match.cfg_combine(*v.chunk(2), cfg) if use_cfg else v
        t = timesteps[i].expand(x.shape[0])
        v = flow.velocity(run, x, t, cond)
        return flow_match.cfg_combine(flow.velocity(run, x, t, uncond), v, cfg) if use_cfg else v

    def preview(x0: torch.Tensor):
        return flow.preview(flow.from_model(x0, shape))

    out = flow_match.euler_loop(predict, x, sigmas.to(device), first, preview=preview, blend=blend)
    check_finite(out, f"{families.title(flow.family)} DiT", dtype)
    return flow.from_model(out, shape).cpu()
