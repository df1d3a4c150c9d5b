"""LoRA training nodes shared by the families: the dataset, Save LoRA, and the factories of each family's Train LoRA
widgets and Apply Trained LoRA node. The training itself is samplers/lora_training.py."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

from ..loaders.errors import LetterpressError
from ..loaders.files import list_files
from ..loaders.host import get_host
from ..loaders.lora import check_against, for_dit
from ..samplers import lora_training as training
from .common import CATEGORY, seed_input
from .dit_options import _dit_node

DATASET, LORA = "LP_TRAIN_DATASET", "LP_LORA"
CAT = f"{CATEGORY}/Training"


class LetterpressTrainingDataset:
    DESCRIPTION = ("Images and captions to train a LoRA on, from a folder under ComfyUI's input folder: images with "
                   "same-named .txt captions (a.png + a.txt), DiffSynth-Studio's metadata.csv (columns image, prompt), "
                   "or kohya's N_name/ folders (each image N times per epoch; without a caption file, captioned with "
                   "the folder's name); or an IMAGE batch with one caption per line. An image without a caption is "
                   "named in an error. Images keep their aspect ratio: Train LoRA resizes each to its resolution "
                   "bucket without cropping.")
    CATEGORY = CAT
    RETURN_TYPES = (DATASET,)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": ("STRING", {"default": "lora_dataset", "tooltip": "A folder under ComfyUI's "
                                                   "input folder: images with same-named .txt captions, a "
                                                   "metadata.csv, or kohya N_name folders. Ignored when images are "
                                                   "wired."})},
                "optional": {"images": ("IMAGE", {"tooltip": "Instead of the folder: the training images."}),
                             "captions": ("STRING", {"multiline": True, "default": "", "tooltip":
                                                     "With images: one caption per line, one line per image (or one "
                                                     "line for all)."}),
                             "repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "Each image this "
                                                 "many times per epoch (DiffSynth-Studio's --dataset_repeat), times "
                                                 "a kohya folder's N."})}}

    def run(self, folder, images=None, captions="", repeats=1):
        return (self.load(folder, images, captions).repeated(repeats),)

    @staticmethod
    def load(folder, images, captions):
        if images is not None:
            return training.dataset_from_images(images, captions)
        root = os.path.realpath(get_host().input_dir)
        path = os.path.realpath(os.path.join(root, folder))
        if os.path.isabs(folder) or not (path == root or path.startswith(root + os.sep)):
            raise LetterpressError(f"The dataset folder '{folder}' must be a folder inside ComfyUI's input folder "
                                   f"({root}), named relative to it.")
        return training.dataset_from_folder(path)


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


class LetterpressSaveLoRA:
    DESCRIPTION = ("Writes a trained LoRA to the output folder in the diffusers/PEFT format "
                   "(transformer.<layer>.lora_A.weight, the PEFT settings in the file's metadata as diffusers writes "
                   "them), which diffusers' load_lora_weights and the LoRA Loader nodes read, or in DiffSynth-Studio's "
                   "(<layer>.lora_A.default.weight, the scale folded in). output/loras is one of the LoRA folders, so "
                   "a file saved under loras/ appears in the LoRA Loaders' lists (refresh) without being moved; a file "
                   "is never replaced.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA, {"tooltip": "The LoRA from a Train LoRA node."}),
                             "filename_prefix": ("STRING", {"default": "loras/letterpress_lora", "tooltip":
                                                            "File name inside the output folder; _00001_.safetensors "
                                                            "and so on are appended. Under loras/ the LoRA Loaders "
                                                            "list it."})},
                "optional": {"format": (list(SAVE_FORMATS), {"default": SAVE_FORMATS[0], "tooltip":
                                        "diffusers/PEFT (diffusers, ComfyUI, this pack) or DiffSynth-Studio's naming "
                                        "(its trainer's files; this pack reads both)."})}}

    def run(self, lora, filename_prefix, format=SAVE_FORMATS[0]):  # noqa: A002 (ComfyUI passes the widget's name)
        if not isinstance(lora, training.TrainedLora):
            raise LetterpressError("The lora input is not a trained LoRA: wire it from a Train LoRA node.")
        path = save_lora(lora, get_host().output_dir, filename_prefix, format)
        name = lora_folder_name(path)
        shown = (f"{path}\nLoRA Loader: {name}" if name is not None else
                 f"{path}\nNot in a LoRA folder: start filename_prefix with loras/ to see it in the LoRA Loaders.")
        return {"ui": {"text": [shown]}, "result": (path,)}


def train_widgets() -> dict:
    """The Train LoRA widgets every family shares."""
    return {
        "rank": ("INT", {"default": 32, "min": 1, "max": 256, "tooltip": "LoRA rank (DiffSynth-Studio's recipe: "
                         "32): 8-32 for a style or font, more for a subject with detail."}),
        "alpha": ("FLOAT", {"default": 32.0, "min": 0.01, "max": 1024.0, "step": 0.01, "tooltip":
                            "LoRA alpha; the update is scaled by alpha / rank (PEFT's lora_alpha; DiffSynth-Studio's "
                            "recipe: alpha = rank)."}),
        "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                    "tooltip": "Learning rate (DiffSynth-Studio's recipe: 1e-4; Prodigy: 1.0, a "
                                    "multiplier of the step size it finds)."}),
        "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimizer steps (ignored when "
                          "epochs is above 0)."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step (drawn from one "
                               "resolution bucket, so a batch may be smaller where a bucket has fewer images)."}),
        "seed": seed_input(),
        "layers": (list(training.LAYER_CHOICES), {"default": "attention", "tooltip": "Which Linear layers of the "
                   "DiT's blocks get a LoRA: attention projections, the MLPs, or every Linear layer of the blocks "
                   "(not the embedders or the modulation outside them). The node's progress text and loss_log say "
                   "how many layers and parameters each choice trains."}),
        "resolution": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16, "tooltip": "Each image is "
                       "resized to about resolution x resolution pixels keeping its aspect ratio (a bucket), never "
                       "cropped."}),
        "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute each DiT block in the "
                                   "backward pass instead of keeping its activations: far less memory, ~30% slower."}),
    }


def option_widgets() -> dict:
    """LoRA Training Options: the trainer settings beyond Train LoRA's own (defaults: DiffSynth-Studio's recipe with
    kohya's clipping)."""
    return {
        "target_modules": ("STRING", {"default": "", "tooltip": "Instead of layers: the modules to train, named as "
                           "DiffSynth-Studio's --lora_target_modules and PEFT's target_modules (a layer is trained "
                           "when its name ends with an entry), e.g. to_q,to_k,to_v,to_out.0. Empty: use layers."}),
        "epochs": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "Train this many epochs instead of "
                           "`steps`: each epoch uses every image once (times its repeats) in a random order."}),
        "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Batches per optimizer "
                                          "step (their gradients summed: the step of a batch this many times "
                                          "larger)."}),
        "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip":
                                    "Gradient clipping: the gradients' total norm is scaled down to this (kohya's "
                                    "default 1.0); 0 turns it off."}),
        "optimizer": (list(training.lora_optim.OPTIMIZERS), {"default": "AdamW", "tooltip": "AdamW (torch, weight "
                      "decay 0.01); AdamW 8-bit needs the bitsandbytes package, Prodigy the prodigyopt package "
                      "(give it learning_rate 1.0)."}),
        "lr_schedule": (list(training.lora_optim.SCHEDULES), {"default": "constant", "tooltip": "The learning "
                        "rate over the run, after the warmup: constant, half a cosine down to 0, or a straight "
                        "line down to 0 (diffusers' get_scheduler formulas)."}),
        "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Steps over which the learning "
                                 "rate rises linearly from 0."}),
        "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": "The "
                                      "chance that an image is trained with the empty caption instead of its own."}),
        "flip": ("BOOLEAN", {"default": False, "tooltip": "Mirror each image left-right half of the time (not for "
                             "text, which reads backwards mirrored)."}),
        "trigger_word": ("STRING", {"default": "", "tooltip": "A word put first in every caption (or where a "
                                    "caption writes [trigger]), to call the LoRA up in prompts."}),
    }


def progress_widgets() -> dict:
    """LoRA Training Checkpoints: checkpoints, samples and resuming."""
    return {
        "sample_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Draw sample_prompt with the LoRA "
                                 "so far every this many steps (seed `seed`, at the training resolution): shown on "
                                 "the node as the run goes (ComfyUI's preview) and saved to output/letterpress/"
                                 "<family>_samples/; 0: none."}),
        "sample_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompt of the samples (with "
                                     "the trigger word if the LoRA has one)."}),
        "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampler steps of each sample."}),
        "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Save a checkpoint every this many "
                               "steps to output/loras/<family>_checkpoints/ (listed by the LoRA Loaders, with its "
                               "optimizer state beside it to resume from); 0: none."}),
        "keep_last": ("INT", {"default": 3, "min": 0, "max": 1000, "tooltip": "Keep only this run's last this many "
                              "checkpoints (older ones it wrote are deleted); 0 keeps all."}),
        "resume_from": (["none", *list_files("loras")], {"default": "none", "tooltip": "Continue a run from a LoRA "
                        "Train LoRA saved (a checkpoint, a cancelled run or Save LoRA's diffusers/PEFT file) with the "
                        "same settings: its optimizer state is read from the .training_state file beside it, and "
                        "`steps` (or epochs) counts the steps done."}),
    }


OPTIONS = "LP_TRAIN_OPTIONS"


def options_node(class_name: str, description: str, widgets: Callable[[], dict]):
    """A node adding settings to a Train LoRA node's `options` (chained: each adds its own to those wired in)."""

    class Options:
        DESCRIPTION = description
        CATEGORY = CAT
        RETURN_TYPES = (OPTIONS,)
        RETURN_NAMES = ("options",)
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": widgets(), "optional": {"options": (OPTIONS, {"tooltip": "Other training options to "
                                                                               "add these to."})}}

        def run(self, options=None, **values):
            return ({**(options or {}), **values},)

    Options.__name__ = Options.__qualname__ = class_name
    return Options


LetterpressLoRATrainingOptions = options_node(
    "LetterpressLoRATrainingOptions",
    "Trainer settings for a Train LoRA node's options input: target modules, epochs, gradient accumulation and "
    "clipping, optimizer, learning-rate schedule and warmup, caption dropout, flip, trigger word. Without it Train "
    "LoRA uses these defaults (DiffSynth-Studio's recipe, kohya's clipping at 1.0).", option_widgets)
LetterpressLoRATrainingCheckpoints = options_node(
    "LetterpressLoRATrainingCheckpoints",
    "Checkpoints, samples and resuming for a Train LoRA node's options input: a checkpoint every N steps (keeping the "
    "last K, with the optimizer state beside it), a sample image every N steps shown on the node as the run goes, "
    "and resume_from a saved LoRA.", progress_widgets)


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


def step_hooks(*hooks: Callable | None) -> Callable | None:
    """One on_step running each hook; the preview is the last one any returned."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def on_step(step, snapshot):
        shown = None
        for h in live:
            shown = h(step, snapshot) or shown
        return shown

    return on_step


def resume_of(name: str, family: str):
    """The saved run `resume_from` names (None for "none")."""
    from ..loaders.files import resolve
    from ..samplers import lora_resume

    return None if name in ("", "none") else lora_resume.load(resolve("loras", name), family)


def settings_of(values: dict) -> training.TrainingSettings:
    """The training settings among the node's widget values (the others are the dataset's and the family's)."""
    names = {f.name for f in dataclasses.fields(training.TrainingSettings)}
    return training.TrainingSettings(**{k: v for k, v in values.items() if k in names})


def cancelled_saver(family: str):
    """On Cancel, the LoRA of the steps done goes to output/loras/<family>_cancelled_..., and its path to the log."""
    from ..samplers.numerics import log

    def save(lora: training.TrainedLora) -> None:
        path = save_lora(lora, get_host().output_dir, f"loras/{family}_cancelled_step{lora.steps}")
        log.warning("Training cancelled after %d steps; the LoRA of those steps is in %s.", lora.steps, path)

    return save


def apply_trained_node(class_name: str, family_title: str, dit_type: str, family: str):
    """DiT + trained LoRA + strength -> DiT, through the same path as a LoRA file (LoRA Loader)."""

    def apply(dit, lora, strength):
        weights = for_dit(training.check_trained(lora, family).weights(), dit)
        check_against(weights, dit, f"{family_title} DiT")
        return get_host().add_patches(dit, weights, strength)

    return _dit_node(
        class_name, family_title, dit_type,
        f"Applies a LoRA trained in this graph (Train LoRA) to the {family_title} DiT, as the LoRA Loader applies a "
        "file: wire the result into DiT Sample for a preview of what the LoRA draws.",
        lambda: {"lora": (LORA, {"tooltip": f"The LoRA from {family_title} Train LoRA."}),
                 "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                        "tooltip": "0 leaves the DiT unchanged."})},
        apply,
    )


def train_lora_node(class_name: str, family_title: str, description: str, models: dict, extra: Callable[[], dict],
                    encode: Callable, family: Callable, preview: Callable):
    """A family's Train LoRA node: its models (input name -> (socket type, tooltip), the DiT first) and the dataset
    in, the shared widgets plus `extra()`; `encode(the other models..., dataset, resolution)` caches the items,
    `family(**extra)` is the family's training objective and `preview(the other models..., prompt, size, seed)`
    prepares the samples (the prompt encoded once) as a `draw(dit, steps) -> IMAGE`."""

    class TrainLoRA:
        DESCRIPTION = description
        CATEGORY = f"{CATEGORY}/{family_title}"
        RETURN_TYPES = (LORA, "IMAGE", "STRING")
        RETURN_NAMES = ("lora", "loss_plot", "loss_log")
        OUTPUT_TOOLTIPS = ("The trained LoRA: into Save LoRA or Apply Trained LoRA.",
                           "The loss per step (light) and its moving average (dark), with step and loss axes.",
                           "The same numbers as JSON: each step's loss, its items' timesteps, the learning rate and "
                           "the moving average, and a summary (final loss, final average, mean, minimum).")
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {**{name: (kind, {"tooltip": tip}) for name, (kind, tip) in models.items()},
                                 "dataset": (DATASET, {"tooltip": "From LoRA Training Dataset."}),
                                 **train_widgets(), **extra()},
                    "optional": {"options": (OPTIONS, {"tooltip": "From LoRA Training Options / Checkpoints: "
                                                       "the settings beyond these (their defaults without it)."})}}

        def run(self, dataset, options=None, **values):
            values = {**values, **(options or {})}
            handles = [values.pop(name) for name in models]
            extras = {name: values.pop(name) for name in extra()}
            settings = settings_of(values)
            settings.check()  # before the encoding: a bad setting is named at once
            items, table = training.prepare(dataset, settings)
            latents, conds = encode(*handles[1:], items, values["resolution"])
            fam = family(**extras)
            resume = resume_of(values.get("resume_from", "none"), fam.name)
            samples = None
            if values.get("sample_every", 0) > 0:
                draw = preview(*handles[1:], values.get("sample_prompt", ""), values["resolution"], settings.seed)
                samples = sampler_hook(fam.name, draw, values["sample_every"], values.get("sample_steps", 20),
                                       handles[0])
            hooks = step_hooks(checkpointer(fam.name, values.get("save_every", 0), values.get("keep_last", 3)),
                               samples)
            lora = training.train(handles[0], fam, latents, conds, settings, on_cancel=cancelled_saver(fam.name),
                                  table=table, resume=resume, on_step=hooks)
            return (lora, training.loss_plot(lora.losses), lora.log.to_json())

    TrainLoRA.__name__ = TrainLoRA.__qualname__ = class_name
    return TrainLoRA


NODES = {c.__name__: c for c in (LetterpressTrainingDataset, LetterpressSaveLoRA, LetterpressLoRATrainingOptions,
                                 LetterpressLoRATrainingCheckpoints)}
DISPLAY_NAMES = {"LetterpressTrainingDataset": "LoRA Training Dataset", "LetterpressSaveLoRA": "Save LoRA",
                 "LetterpressLoRATrainingOptions": "LoRA Training Options",
                 "LetterpressLoRATrainingCheckpoints": "LoRA Training Checkpoints"}
