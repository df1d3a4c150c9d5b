"""Widgets and helpers shared by the node classes of every family."""

from __future__ import annotations

from ..loaders.files import list_diffusers_folders, list_files
from ..loaders.host import LetterpressError
from ..loaders.weights import WEIGHT_DTYPE_CHOICES

CATEGORY = "Letterpress"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 8192


def dtype_input():
    return (WEIGHT_DTYPE_CHOICES, {"default": "auto", "tooltip": "Weight dtype. auto: fp32 on CPU, bf16 on GPUs that have it, else fp16."})


def file_input(kind: str, tooltip: str):
    return (list_files(kind), {"tooltip": tooltip})


def folder_input(class_names: tuple[str, ...], tooltip: str):
    return (list_diffusers_folders(class_names), {"tooltip": tooltip})


def seed_input():
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed; the same seed gives the same image as the reference pipeline."})


def size_input(default: int, step: int, what: str):
    return ("INT", {"default": default, "min": step, "max": MAX_SIZE, "step": step,
                    "tooltip": f"{what} in pixels, a multiple of {step}."})


def require(handle, what: str, wire_from: str):
    """A clear error when an optional model output (e.g. a folder without a prompt enhancer) is wired."""
    if handle is None:
        raise LetterpressError(f"No {what} is loaded: {wire_from}.")
    return handle
