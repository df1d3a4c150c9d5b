"""The host outside ComfyUI: device choice, offload between stages, tqdm progress, an interrupt flag and a
ComfyUI-like models/ tree. ComfyHost (comfy_host.py) keeps this surface and hands the work to ComfyUI.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from typing import Any, Callable, Iterable

import torch

from . import layers
from .errors import Interrupted, LetterpressError
from .handle import ModelHandle

# Model folder kinds the pack uses, with the ComfyUI names they alias.
FOLDER_ALIASES = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "diffusers": ("diffusers",),
    "loras": ("loras",),
    "LLM": ("LLM",),
}
# Where Train LoRA's cancelled runs and Save LoRA's default prefix write, under the output folder: a LoRA folder
# too (here and, registered with folder_paths, in ComfyUI), so the LoRA Loaders list what was trained.
TRAINED_LORAS = "loras"


class Progress:
    """Per-step progress: tqdm in the standalone host, ComfyUI's ProgressBar (with previews) inside it."""

    def __init__(self, total: int, bar: Any = None, listeners: Iterable[Callable] = (),
                 show_text: Callable[[str], None] | None = None):
        self.total = total
        self.done = 0
        self._bar = bar
        self._listeners = list(listeners)
        self._show_text = show_text
        self.last_text = ""

    def update(self, n: int = 1, preview: Any = None) -> None:
        """Advance by n; `preview` is a PIL image of the current estimate, shown where the host can."""
        self.done += n
        if self._bar is not None:
            if hasattr(self._bar, "update_absolute"):  # ComfyUI's ProgressBar
                shown = ("JPEG", preview, 512) if preview is not None else None  # ComfyUI's preview tuple
                self._bar.update_absolute(self.done, self.total, shown)
            else:
                self._bar.update(n)
        self.last_preview = preview
        for listener in self._listeners:
            listener(self.done, self.total)

    def text(self, message: str) -> None:
        """A line shown with the bar (tqdm's postfix; ComfyUI's progress text under the node)."""
        self.last_text = message
        if self._show_text is not None:
            self._show_text(message)
        elif self._bar is not None and hasattr(self._bar, "set_postfix_str"):
            self._bar.set_postfix_str(message, refresh=False)

    def close(self) -> None:
        if self._bar is not None and hasattr(self._bar, "close"):
            self._bar.close()


def _pick_device() -> torch.device:
    wanted = os.environ.get("LETTERPRESS_DEVICE")
    if wanted:
        return torch.device(wanted)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class StandaloneHost:
    """The host outside ComfyUI: one model stage on the compute device at a time, the rest on CPU."""

    name = "standalone"

    def __init__(self) -> None:
        self.models_dir = os.environ.get("LETTERPRESS_MODELS_DIR", os.path.join(os.getcwd(), "models"))
        self.output_dir = os.environ.get("LETTERPRESS_OUTPUT_DIR", os.path.join(os.getcwd(), "output"))
        self.input_dir = os.environ.get("LETTERPRESS_INPUT_DIR", os.path.join(os.getcwd(), "input"))
        self._device = _pick_device()
        self._interrupt = threading.Event()
        # Bytes of weights kept on the compute device between stages (LETTERPRESS_DEVICE_BUDGET, e.g. "12GB");
        # 0 keeps only the stages of the current load. Least recently used stages leave first.
        self.device_budget = _parse_bytes(os.environ.get("LETTERPRESS_DEVICE_BUDGET", "0"))
        # Stages on the compute device, least recently used first, as weak references: the host never keeps a
        # model alive by itself (what holds models in CPU memory is whoever holds the handles, e.g. a cache).
        self._loaded: list[tuple[weakref.ref, str, int]] = []
        self.progress_listeners: list[Callable[[int, int], None]] = []
        self.show_progress = True
        self.previews = False  # the standalone host has no screen to show previews on

    # devices -------------------------------------------------------------------------------
    def compute_device(self) -> torch.device:
        return self._device

    def offload_device(self) -> torch.device:
        return torch.device("cpu")

    def layer_ops(self, weight_dtype: torch.dtype) -> layers.LayerOps:
        """The layer classes a stage loaded in `weight_dtype` is built from (see layers.py)."""
        return layers.standalone_ops(weight_dtype, self.compute_device())

    def model_class(self, cls: type) -> type:
        """The class a transformers model is built as (here its own: its weights are where it computes)."""
        return cls

    def wrap(self, handle: ModelHandle) -> ModelHandle:
        return handle

    def add_patches(self, handle: ModelHandle, lora, strength: float) -> ModelHandle:
        """A new handle on the same module with one more LoRA; the input handle is left as it was."""
        return dataclasses.replace(handle, patches=handle.patches + ((lora, strength),))

    def load(self, *handles: ModelHandle, memory_required: int = 0) -> None:
        """Bring these stages onto the compute device; move the least recently used others off it until the
        weights kept there, plus the `memory_required` bytes of activations the stages' forward will need, fit
        `device_budget` (the stages asked for now always stay)."""
        device = self.compute_device()
        wanted = list({id(h.module): h.module for h in handles}.values())
        held = [(m, d, n) for m, d, n in self._live() if all(m is not w for w in wanted)]
        need = sum(_weight_bytes(m) for m in wanted) + memory_required
        while held and sum(n for _, _, n in held) + need > self.device_budget:
            m, _, _ = held.pop(0)
            if device.type != "cpu":
                m.to(self.offload_device())
        for h in handles:
            if h.device != device:
                h.module.to(device)
            layers.set_loras(h.module, h.patches)  # this handle's LoRAs, at forward time
        described = {id(h.module): h.describe() for h in handles}
        self._loaded = [(weakref.ref(m), d, n) for m, d, n in held] + [
            (weakref.ref(m), described[id(m)], _weight_bytes(m)) for m in wanted]

    def _live(self) -> list[tuple[torch.nn.Module, str, int]]:
        out = []
        for ref, what, n in self._loaded:
            m = ref()
            if m is not None:
                out.append((m, what, n))
        return out

    def loaded_models(self) -> list[str]:
        """The stages the host keeps on the compute device (still alive), least recently used first."""
        return [what for _, what, _ in self._live()]

    def loaded_bytes(self) -> int:
        return sum(n for _, _, n in self._live())

    def free(self) -> None:
        for m, _, _ in self._live():
            m.to(self.offload_device())
        self._loaded = []

    # progress and interrupt ----------------------------------------------------------------
    def progress(self, total: int) -> Progress:
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, leave=False)
        return Progress(total, bar, self.progress_listeners)

    def request_interrupt(self, value: bool = True) -> None:
        if value:
            self._interrupt.set()
        else:
            self._interrupt.clear()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._interrupt.clear()
            raise Interrupted("Run cancelled.")

    def previews_enabled(self) -> bool:
        return self.previews

    # model folders -------------------------------------------------------------------------
    def model_folders(self, kind: str) -> list[str]:
        names = FOLDER_ALIASES.get(kind, (kind,))
        folders = [os.path.join(self.models_dir, n) for n in names]
        return folders + [os.path.join(self.output_dir, TRAINED_LORAS)] if kind == "loras" else folders


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _parse_bytes(text: str) -> int:
    """'0', '8000000000', '12GB', '512MB' -> bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale > 1 else t or 0) * scale)
    except ValueError:
        n = -1
    if n < 0:
        raise LetterpressError(f"LETTERPRESS_DEVICE_BUDGET={text!r}: give bytes, e.g. 12GB or 512MB (0 or more).")
    return n
