"""What a Train LoRA run writes: the LoRA files (never replacing one, numbered past every LoRA folder's), the
checkpoints every N steps (the last K kept), the samples every N steps, the LoRA of a cancelled run, and reading a
saved run back to resume it."""

from __future__ import annotations

import os
import re
from typing import Callable

from ..loaders.errors import LetterpressError
from ..loaders.host import get_host
from ..samplers import lora_training as training

SAVE_FORMATS = ("diffusers/PEFT", "DiffSynth-Studio")


def save_lora(lora: training.TrainedLora, folder: str, prefix: str, fmt: str = SAVE_FORMATS[0]) -> str:
    """Write the LoRA as <prefix>_NNNNN_.safetensors under `folder`, never replacing a file: the number is the next
    free one there and, for a file in a LoRA folder, in every LoRA folder (so the LoRA Loader's list names one
    file)."""
    from ..core_nodes import expand_prefix, prefix_problem

    problem = prefix_problem(prefix)
    if problem:
        raise LetterpressError(problem)
    sub, base = os.path.split(os.path.normpath(expand_prefix(prefix)))
    target = os.path.join(folder, sub)
    os.makedirs(target, exist_ok=True)
    listed = lora_folder_name(target)
    places = [target] + ([os.path.join(f, listed) for f in get_host().model_folders("loras")]
                         if listed is not None else [])
    pattern = re.compile(re.escape(base) + r"_(\d{5})_\.safetensors$")
    found = [int(m.group(1)) for p in places if os.path.isdir(p) for f in os.listdir(p) if (m := pattern.match(f))]
    counter = max(found, default=0) + 1
    while any(os.path.exists(os.path.join(p, f"{base}_{counter:05}_.safetensors")) for p in places):
        counter += 1
    path = os.path.join(target, f"{base}_{counter:05}_.safetensors")
    lora.save(path, "diffsynth" if fmt == SAVE_FORMATS[1] else "diffusers")
    return path


def lora_folder_name(path: str) -> str | None:
    """The name the LoRA Loaders list `path` (a file or folder) under, or None outside the LoRA folders."""
    real = os.path.realpath(path)
    for folder in get_host().model_folders("loras"):
        root = os.path.realpath(folder)
        if real == root or real.startswith(root + os.sep):
            return os.path.relpath(real, root).replace(os.sep, "/")
    return None


def checkpointer(family: str, save_every: int, keep_last: int) -> Callable | None:
    """Train's on_step for checkpoints: every `save_every` steps the LoRA so far (and its optimizer state) goes to
    output/loras/<family>_checkpoints/, and all but the last `keep_last` this run wrote are deleted."""
    from ..samplers.lora_resume import state_path
    from ..samplers.numerics import log

    if save_every <= 0:
        return None
    written: list[str] = []

    def on_step(step: int, snapshot: Callable[[], training.TrainedLora]) -> None:
        if step % save_every:
            return
        path = save_lora(snapshot(), get_host().output_dir, f"loras/{family}_checkpoints/{family}_step{step:06}")
        written.append(path)
        log.info("Train LoRA: checkpoint at step %d in %s", step, path)
        while keep_last and len(written) > keep_last:
            old = written.pop(0)
            for f in (old, state_path(old)):
                if os.path.exists(f):
                    os.remove(f)

    return on_step


def sampler_hook(family: str, draw: Callable, every: int, steps: int, dit) -> Callable:
    """Train's on_step for samples: every `every` steps `draw(dit, steps)` (the DiT with the LoRA's training hooks
    on it: the LoRA so far) -> an IMAGE, saved as output/letterpress/<family>_samples/stepNNNNNN_NNNNN_.png and
    returned as the preview the node shows."""
    from PIL import Image

    def on_step(step: int, snapshot) -> Image.Image | None:
        if step % every:
            return None
        image = draw(dit, steps)
        pil = Image.fromarray((image[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
        folder = os.path.join(get_host().output_dir, "letterpress", f"{family}_samples")
        os.makedirs(folder, exist_ok=True)
        n = 1
        while os.path.exists(path := os.path.join(folder, f"step{step:06}_{n:05}_.png")):
            n += 1
        pil.save(path)
        return pil

    return on_step


def resume_of(name: str, family: str):
    """The saved run `resume_from` names (None for "none")."""
    from ..loaders.files import resolve
    from ..samplers import lora_resume

    return None if name in ("", "none") else lora_resume.load(resolve("loras", name), family)


def cancelled_saver(family: str):
    """On Cancel, the LoRA of the steps done goes to output/loras/<family>_cancelled_..., and its path to the log."""
    from ..samplers.numerics import log

    def save(lora: training.TrainedLora) -> None:
        path = save_lora(lora, get_host().output_dir, f"loras/{family}_cancelled_step{lora.steps}")
        log.warning("Training cancelled after %d steps; the LoRA of those steps is in %s.", lora.steps, path)

    return save
