"""LoRA training of a family's DiT inside the graph: datasets, resolution buckets, LoRA adapters on the frozen DiT,
the flow-matching training step, the trained LoRA as tensors in PEFT naming, and the loss plot.

The step uses the family's FlowModel (flow_sampler), the object its sampler runs: its model call and its schedule at
1000 steps. x_t = sigma * noise + (1 - sigma) * x0 at a timestep drawn uniformly from those 1000, the
target noise - x0, the mean squared error (times the family's timestep weight). A LoRA layer is PEFT's: the frozen
layer's output plus scale * B(A(x)), A and B in fp32, A initialised kaiming-uniform and B zero. The frozen layer
computes as it always does (bf16, fp8 storage, or a packed quantized weight dequantized per call: QLoRA), so no
weight is copied or changed. The optimizer is torch's AdamW.

Text encodings and latents are computed once per dataset item by the family (`encode_items`), then the text
encoder and VAE are left to the host to unload while the DiT trains.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..loaders import layers as layer_kinds
from ..loaders.errors import Interrupted, LetterpressError
from ..loaders.handle import ModelHandle
from ..loaders.host import get_host
from ..loaders.lora import LoraTensors, LoraWeights, parse_lora
from . import lora_optim, lora_resume, lora_targets
from .flow_sampler import Training
from .lora_datasets import (  # noqa: F401 (the nodes' and families' names for them)
    TrainingDataset,
    dataset_from_folder,
    dataset_from_images,
    prepare,
)
from .lora_loss import LossLog, loss_plot  # noqa: F401 (loss_plot: the nodes' and tests' name for it)
from .lora_plan import Draw, ItemTable, StepPlan
from .lora_targets import LAYER_CHOICES, target_layers  # noqa: F401 (the nodes' and tests' names for them)
from .numerics import check_seed, log

# Datasets ------------------------------------------------------------------------------------------------------


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """The training size of a width x height image: about resolution^2 pixels, its aspect ratio kept, each side a
    multiple of `step` (the image is resized, never cropped, so text at its edges stays in)."""
    scale = math.sqrt(resolution * resolution / (width * height))
    return (max(step, round(width * scale / step) * step), max(step, round(height * scale / step) * step))


def encode_items(vae: ModelHandle, te: ModelHandle, dataset, resolution: int, step: int,
                 encode_image: Callable, encode_caption: Callable) -> tuple[list, list]:
    """Each item's latents (`encode_image(vae, image)` at its resolution bucket, sides multiples of `step`) and its
    caption's encoding (`encode_caption(te, text)`, once per distinct caption): computed once for a training run,
    the VAE and then the text encoder brought to the device by the host."""
    from . import working_memory

    host = get_host()
    latents, done = [], {}  # an image object listed twice (a caption-dropped variant) is encoded once
    for img in dataset.images:
        if id(img) not in done:
            w, h = bucket_size(img.shape[2], img.shape[1], resolution, step)
            host.load(vae, memory_required=working_memory.vae(vae, 1, h, w))
            done[id(img)] = encode_image(vae, resize(img, w, h))
        latents.append(done[id(img)])
    host.load(te)
    cache: dict[str, torch.Tensor] = {}
    for c in dataset.captions:
        if c not in cache:
            cache[c] = encode_caption(te, c)
    return latents, [cache[c] for c in dataset.captions]


def resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(1, H, W, 3) -> (1, height, width, 3), antialiased bicubic, clamped to 0..1."""
    if image.shape[1:3] == (height, width):
        return image
    x = image.movedim(-1, 1)
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.movedim(1, -1).clamp(0, 1)


# LoRA layers ---------------------------------------------------------------------------------------------------


class LoraLayer(torch.nn.Module):
    """PEFT's LoRA on one frozen layer: out + scale * B(A(x)), computed in fp32, as a forward hook."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device, generator=None):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, device=device))
        a = torch.empty(rank, in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's (and nn.Linear's) init
        with torch.no_grad():
            self.lora_A.copy_(a)
        self.scale = scale

    def hook(self, layer, args, out):
        x = args[0]
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return out + delta.to(out.dtype)


def usable_for_autograd(module: torch.nn.Module) -> None:
    """Tensors made under torch.inference_mode (ComfyUI runs every node in it, loaders included) cannot be saved for
    backward: give each such parameter and buffer a normal tensor over the same memory (no copy). A normal tensor
    stays normal: the module's next use in inference mode is unaffected."""
    for m in module.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.is_inference():
                plain = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                    t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                if isinstance(t, torch.nn.Parameter):  # a new Parameter: the old object stays an inference tensor
                    m._parameters[name] = torch.nn.Parameter(plain, requires_grad=False)
                else:
                    m._buffers[name] = plain


# The trained LoRA ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TrainedLora:
    """A LoRA trained in the graph (socket LP_LORA): its tensors in diffusers/PEFT naming
    (transformer.<layer>.lora_A.weight) and the PEFT settings diffusers writes into a file's metadata."""

    family: str
    tensors: dict
    rank: int
    alpha: float
    targets: list
    steps: int
    log: LossLog = field(default_factory=LossLog)
    state: dict | None = None  # the optimizer's state when trained here: saved beside the file, to resume from

    @property
    def losses(self) -> list[float]:
        return self.log.losses

    @property
    def metadata(self) -> dict:
        config = {"r": self.rank, "lora_alpha": self.alpha, "target_modules": sorted(self.targets),
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                  "init_lora_weights": True}
        packed = {f"transformer.{k}": v for k, v in config.items()}  # as diffusers' save_lora_weights packs them
        return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True),
                "letterpress_family": self.family, "letterpress_steps": str(self.steps), **self.log.metadata()}

    def weights(self) -> LoraWeights:
        return parse_lora(LoraTensors(self.tensors, self.metadata), f"trained {self.family} LoRA ({self.steps} steps)")

    def diffsynth_tensors(self) -> dict:
        """DiffSynth-Studio's naming (`<layer>.lora_A.default.weight`, as its trainer saves PEFT's default adapter):
        its loader adds B @ A unscaled, so alpha / rank is folded into B."""
        scale = self.alpha / self.rank
        out = {}
        for key, t in self.tensors.items():
            layer, side = key[len("transformer."):].rsplit(".lora_", 1)
            side = side.split(".")[0]
            out[f"{layer}.lora_{side}.default.weight"] = t * scale if side == "B" else t
        return out

    def save(self, path: str, fmt: str = "diffusers") -> None:
        """Write the LoRA: `fmt` diffusers (PEFT naming with diffusers' metadata) or diffsynth (DiffSynth-Studio's)."""
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if fmt == "diffsynth":
            tensors = self.diffsynth_tensors()
            metadata = {k: v for k, v in self.metadata.items() if k != "lora_adapter_metadata"}
        else:
            tensors, metadata = self.tensors, self.metadata
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
        if self.state is not None and fmt != "diffsynth":
            lora_resume.save_state(path, {"step": self.steps, "optimizer": self.state, "log": self.log.steps})


def check_trained(lora, family: str) -> TrainedLora:
    from ..loaders.families import title

    if not isinstance(lora, TrainedLora):
        raise LetterpressError("The lora input is not a trained LoRA: wire it from a Train LoRA node.")
    if lora.family != family:
        raise LetterpressError(f"This LoRA was trained on the {title(lora.family)} DiT; "
                               f"it does not fit the {title(family)} DiT.")
    return lora


# Training ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    """A run's settings; the defaults are DiffSynth-Studio's DiT LoRA recipe (rank 32, alpha = rank,
    learning rate 1e-4, AdamW with weight decay 0.01, constant rate, the attention projections) with kohya's
    gradient clipping at 1.0. Checked as it is made (frozen after): the Train LoRA node names a bad setting before
    it encodes anything, a caller of train() from Python when it makes the settings, and nothing checks them again.
    The rules that need the data (batch_size against the buckets, warmup_steps against the run's steps) and the
    optimizer's package are checked once where those are known (StepPlan, train, lora_optim.make_optimizer)."""

    rank: int = 32
    alpha: float = 32.0
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 1
    seed: int = 0
    layers: str = "attention"
    gradient_checkpointing: bool = True
    target_modules: str = ""  # DiffSynth-Studio / PEFT target modules; when given, instead of `layers`
    epochs: int = 0  # when > 0, the run is this many epochs (`steps` is ignored)
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    optimizer: str = "AdamW"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    caption_dropout: float = 0.0
    flip: bool = False
    trigger_word: str = ""
    log_every: int = 10

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("rank", "steps", "batch_size", "gradient_accumulation", "log_every"):
            if getattr(self, name) < 1:
                raise LetterpressError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("epochs", "warmup_steps"):
            if getattr(self, name) < 0:
                raise LetterpressError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise LetterpressError(f"learning_rate must be a positive number, got {self.learning_rate}.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise LetterpressError(f"alpha must be a positive number, got {self.alpha}.")
        if not (0 <= self.caption_dropout < 1):
            raise LetterpressError(f"caption_dropout is a probability below 1 (0 keeps every caption), got "
                                   f"{self.caption_dropout}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise LetterpressError(f"max_grad_norm must be 0 (no clipping) or more, got {self.max_grad_norm}.")
        if self.lr_schedule not in lora_optim.SCHEDULES:
            raise LetterpressError(f"lr_schedule must be one of {', '.join(lora_optim.SCHEDULES)}, got "
                                   f"{self.lr_schedule!r}.")
        if self.optimizer not in lora_optim.OPTIMIZERS:
            raise LetterpressError(f"optimizer must be one of {', '.join(lora_optim.OPTIMIZERS)}, got "
                                   f"{self.optimizer!r}.")

    def total_steps(self, plan: StepPlan) -> int:
        """The optimizer steps of the run: `steps`, or `epochs` times an epoch's batches over the accumulation."""
        if self.epochs > 0:
            return math.ceil(self.epochs * plan.batches_per_epoch() / self.gradient_accumulation)
        return self.steps


def flow_matching_loss(family: Training, dit: ModelHandle, run, latents: list[torch.Tensor], conds: list,
                       d: Draw, cache: dict | None = None, seen: list | None = None) -> torch.Tensor:
    """The training objective on one drawn batch: x_t = sigma * noise + (1 - sigma) * x0, target noise - x0, the
    mean over items of each item's mean squared error (times its timestep's weight). `seen` receives the timestep
    each item was noised at (the value the family's DiT call gets)."""
    flow = family.flow
    if flow.one_at_a_time and len(d.items) > 1:
        parts = [flow_matching_loss(family, dit, run, latents, conds, Draw([i], d.noise[k: k + 1], d.t_index[k: k + 1]),
                                    cache, seen) for k, i in enumerate(d.items)]
        return torch.stack(parts).mean()
    device, dtype = dit.device, dit.dtype
    x0 = torch.cat([latents[i] for i in d.items]).to(device, torch.float32)
    sigmas, timesteps, weights = _schedule(family, dit, x0.shape, cache)
    sigma = sigmas[d.t_index].to(device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    noise = d.noise.to(device)
    xt = sigma * noise + (1 - sigma) * x0
    target = noise - x0
    inputs = flow.inputs(dit, [conds[i] for i in d.items], x0.shape)
    t = timesteps[d.t_index]
    if seen is not None:
        seen.extend(float(v) for v in t.flatten())
    v = flow.velocity(run, flow.to_model(xt.to(dtype)), t, inputs)
    per_item = ((v.float() - flow.to_model(target)) ** 2).flatten(1).mean(1)
    if weights is not None:
        per_item = per_item * weights[d.t_index].to(device)
    return per_item.mean()


def _schedule(family: Training, dit: ModelHandle, shape, cache: dict | None) -> tuple:
    """The family's (sigmas, timesteps, weights) for a latent shape (kept in `cache` per size during a run): its
    sampler's schedule at 1000 steps."""
    key = tuple(shape[1:])
    if cache is None or key not in cache:
        flow = family.flow
        sigmas, timesteps = flow.training_schedule(dit, shape, **family.options)
        found = (sigmas, timesteps, flow.loss_weight(timesteps) if flow.loss_weight is not None else None)
        if cache is None:
            return found
        cache[key] = found
    return cache[key]


def attach_adapters(module: torch.nn.Module, targets: list[str], settings: TrainingSettings, device,
                    gen: torch.Generator, init: dict | None) -> tuple[dict, list]:
    """A LoraLayer per target (PEFT's init from `gen`, or the factors of `init`) hooked onto its layer."""
    adapters, hooks = {}, []
    for name in targets:
        layer = module.get_submodule(name)
        out_f, in_f = layer_kinds.weight_shape(layer)
        ad = LoraLayer(in_f, out_f, settings.rank, settings.alpha / settings.rank, device, gen)
        if init is not None and name in init:
            with torch.no_grad():
                ad.lora_A.copy_(init[name][0])
                ad.lora_B.copy_(init[name][1])
        adapters[name] = ad
        hooks.append(layer.register_forward_hook(ad.hook))
    return adapters, hooks


class TrainingRun:
    """One run on the loaded DiT: the LoRA adapters hooked onto their layers, the optimizer and its schedule, the
    plan of the steps' items, and the loss record. Made inside train()'s grad-enabled context."""

    def __init__(self, dit: ModelHandle, family: Training, latents: list, conds: list, settings: TrainingSettings,
                 targets: list[str], plan: StepPlan, total: int, init: dict | None, resume, info: dict):
        self.dit, self.family, self.latents, self.conds, self.settings = dit, family, latents, conds, settings
        self.targets, self.plan, self.total = targets, plan, total
        self.done = resume.step if resume is not None else 0
        module = dit.module
        self.adapters, self.hooks = attach_adapters(module, targets, settings, get_host().compute_device(), plan.gen,
                                                    resume.factors if resume is not None else init)
        self.params = [p for ad in self.adapters.values() for p in (ad.lora_A, ad.lora_B)]
        self.optimizer = lora_optim.make_optimizer(settings.optimizer, self.params, settings.learning_rate)
        if resume is not None and resume.optimizer is not None:
            self.optimizer.load_state_dict(resume.optimizer)
        self.scheduler = lora_optim.make_scheduler(self.optimizer, settings.lr_schedule, settings.warmup_steps, total,
                                                   self.done)
        self.losses = LossLog(list(resume.log) if resume is not None else [], info)
        self.schedules: dict = {}  # the family's schedule per latent size, computed once
        for _ in range(self.done):  # a resumed run: the choices of the steps done, skipped over
            plan.next_step()

    def snapshot(self) -> TrainedLora:
        """The LoRA so far (its factors and optimizer state copied to the CPU)."""
        tensors = {}
        for name, ad in self.adapters.items():
            tensors[f"transformer.{name}.lora_A.weight"] = ad.lora_A.detach().float().cpu().clone()
            tensors[f"transformer.{name}.lora_B.weight"] = ad.lora_B.detach().float().cpu().clone()
        s = self.settings
        return TrainedLora(self.family.name, tensors, s.rank, s.alpha, self.targets, self.done,
                           LossLog(list(self.losses.steps), self.losses.info),
                           lora_resume.to_cpu(self.optimizer.state_dict()))

    def step(self, record: list | None) -> None:
        """One optimizer step over its micro-batches: each loss / their count backward (the gradient of their mean),
        clipped, stepped, the learning rate scheduled, the loss recorded."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        draws = self.plan.next_step()
        total_loss, seen = 0.0, []
        for d in draws:
            if record is not None:
                record.append(d)
            loss = flow_matching_loss(self.family, self.dit, self.dit.module, self.latents, self.conds, d,
                                      self.schedules, seen)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LetterpressError(f"The training loss became {value} at step {self.done + 1}: lower the "
                                       "learning rate.")
            (loss / len(draws)).backward()
            total_loss += value / len(draws)
        lora_optim.clip(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.done += 1
        self.losses.add(total_loss, seen, lr, self.done)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def train(dit: ModelHandle, family: Training, latents: list[torch.Tensor], conds: list, settings: TrainingSettings,
          init: dict | None = None, record: list | None = None, on_cancel: Callable | None = None,
          table: ItemTable | None = None, resume: lora_resume.Resume | None = None,
          on_step: Callable | None = None) -> TrainedLora:
    """Train a LoRA on the encoded items (`table`: the dataset items' repeats and variants among them; by default
    each item once, as it is): the optimizer steps of `settings`, progress and Cancel per step.

    `init` (layer -> (A, B)) starts from given factors instead of PEFT's init; `resume` continues a saved run (its
    factors, optimizer state and loss record, the choices of its steps replayed); `record` receives each
    micro-batch's Draw; `on_step(step, snapshot)` runs after each step (snapshot() is the LoRA so far: checkpoints,
    samples; a PIL image it returns is shown as the node's preview). On Cancel the LoRA of the steps done goes to
    `on_cancel` (the node saves it), then the interrupt propagates."""
    host = get_host()
    module = dit.module
    targets = target_layers(module, settings.layers, settings.target_modules)
    counts = lora_targets.describe_choices(module, settings.rank, targets)
    log.info("Train LoRA: %s", lora_targets.choices_line(counts))
    table = table or ItemTable.plain(len(latents))
    plan = StepPlan(torch.Generator("cpu").manual_seed(settings.seed), latents, table, settings.batch_size,
                    settings.gradient_accumulation, settings.flip, settings.caption_dropout)
    total = settings.total_steps(plan)
    if settings.warmup_steps >= total:
        raise LetterpressError(f"warmup_steps ({settings.warmup_steps}) must be fewer than the run's {total} steps.")
    if resume is not None:
        resume.check(settings.rank, settings.alpha, targets, total)
    shape = max((lat.shape for lat in latents), key=lambda s: s[-1] * s[-2])
    # Activations kept for backward (block inputs with checkpointing, one block's in its backward): the host makes
    # room for them as for a sampler's forward.
    need = family.flow.train_memory(dit, settings.batch_size, shape, conds)
    with torch.inference_mode(False), torch.enable_grad():
        host.load(dit, memory_required=need)
        usable_for_autograd(module)
        module.requires_grad_(False)
        run = TrainingRun(dit, family, latents, conds, settings, targets, plan, total, init, resume,
                          {"layers": counts, "epoch_batches": plan.batches_per_epoch()})
        start = run.done
        checkpointing = settings.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False)
        if checkpointing:
            module.enable_gradient_checkpointing()
        bar = host.progress(total - start)
        bar.text(lora_targets.choices_line(counts))
        try:
            while run.done < total:
                host.check_interrupt()
                run.step(record)
                report(run.losses, bar, total, settings.log_every)
                if on_step is not None:
                    with torch.no_grad():
                        shown = on_step(run.done, run.snapshot)
                    if shown is not None:  # a sample was drawn: shown on the node, the DiT made ready again
                        bar.update(0, preview=shown)
                        host.load(dit, memory_required=need)
                        usable_for_autograd(module)
            host.check_interrupt()
        except BaseException as e:  # Cancel: ours (standalone) or ComfyUI's own exception; the steps done are kept
            if (isinstance(e, Interrupted) or type(e).__name__ == "InterruptProcessingException") and \
                    on_cancel is not None and run.done > start:
                on_cancel(run.snapshot())
            raise
        finally:
            bar.close()
            run.remove()
            if checkpointing:
                module.disable_gradient_checkpointing()
        return run.snapshot()


def report(losses: LossLog, bar, total: int, log_every: int) -> None:
    """After each step: the bar advances with the loss and its running average (EMA) as its text; every
    `log_every` steps and at the last the same line goes to the log."""
    line = losses.line(total)
    bar.text(line)
    bar.update(1)
    n = losses.steps[-1]["step"]
    if n % log_every == 0 or n == total:
        log.info("Train LoRA: %s", line)
