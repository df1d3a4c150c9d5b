"""The Train LoRA settings as widgets: those of the family's Train LoRA node, and the nodes that add the others to
its `options` input (LoRA Training Options, LoRA Training Checkpoints)."""

from __future__ import annotations

from typing import Callable

from ..loaders.files import list_files
from ..samplers import lora_optim
from ..samplers import lora_training as training
from .common import CATEGORY, seed_input

CAT = f"{CATEGORY}/Training"


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
        "optimizer": (list(lora_optim.OPTIMIZERS), {"default": "AdamW", "tooltip": "AdamW (torch, weight "
                      "decay 0.01); AdamW 8-bit needs the bitsandbytes package, Prodigy the prodigyopt package "
                      "(give it learning_rate 1.0)."}),
        "lr_schedule": (list(lora_optim.SCHEDULES), {"default": "constant", "tooltip": "The learning "
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
