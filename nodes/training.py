"""LoRA training nodes shared by the families: the dataset, Save LoRA, and the factories of each family's Train LoRA
and Apply Trained LoRA nodes (their widgets and option nodes: training_options.py; the files a run writes:
training_runs.py). The training itself is samplers/lora_training.py."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ..loaders.errors import LetterpressError
from ..loaders.host import get_host
from ..loaders.lora import check_against, for_dit
from ..samplers import lora_training as training
from .common import CATEGORY
from .dit_options import _dit_node
from .training_options import (
    CAT,
    OPTIONS,
    LetterpressLoRATrainingCheckpoints,
    LetterpressLoRATrainingOptions,
    train_widgets,
)
from .training_runs import (
    SAVE_FORMATS,
    cancelled_saver,
    checkpointer,
    lora_folder_name,
    resume_of,
    sampler_hook,
    save_lora,
)

DATASET, LORA = "LP_TRAIN_DATASET", "LP_LORA"


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


def settings_of(values: dict) -> training.TrainingSettings:
    """The training settings among the node's widget values (the others are the dataset's and the family's)."""
    names = {f.name for f in dataclasses.fields(training.TrainingSettings)}
    return training.TrainingSettings(**{k: v for k, v in values.items() if k in names})


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
            settings = settings_of(values)  # checked as it is made: a bad setting is named before the encoding
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
