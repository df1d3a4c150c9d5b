"""Widgets and helpers shared by the node classes of every family."""

from __future__ import annotations

from typing import Callable

import torch

from ..loaders.errors import LetterpressError
from ..loaders.files import list_diffusers_choices, list_files
from ..loaders import storage
from ..samplers import working_memory
from ..samplers.sizes import MAX_SIZE

CATEGORY = "Letterpress"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def dtype_input():
    return (storage.CHOICES, {"default": "auto", "tooltip": (
        "Weight dtype. auto: fp32 on CPU, bf16 on GPUs that have it, else fp16. fp8_e4m3fn: Linear weights stored in "
        "fp8. Q8_0 / Q5_1 / Q5_0 / Q4_1 / Q4_0: Linear weights quantized to that GGUF type as they load (about 1.06 / "
        "0.75 / 0.69 / 0.63 / 0.56 bytes a weight), computed as auto (VAEs and the ByT5 glyph encoder load as auto); "
        "a GGUF file's own types are kept as stored.")})


def weight_storage(choice: str) -> storage.Storage:
    """The weight_dtype widget's choice as the storage the loaders take, resolved here, once, for the host's compute
    device ('auto' means the dtype that device computes in)."""
    from ..loaders.host import get_host

    return storage.resolve(choice, get_host().compute_device())


def file_input(kind: str, tooltip: str):
    return (list_files(kind), {"tooltip": tooltip})


def folder_input(class_names: tuple[str, ...], tooltip: str):
    tip = (f"{tooltip} This model's folders are listed first; the other folders under models/diffusers follow, "
           "and picking one says what it holds and what to download instead.")
    return (list_diffusers_choices(class_names), {"tooltip": tip})


def folder_validator(family: str, loader: str, need: tuple[str, ...] = ()):
    """A VALIDATE_INPUTS classmethod for a `folder` widget under models/diffusers: ComfyUI and the headless runner
    call it before anything loads (and then skip their own 'not in list' check for it), so a folder that is
    missing, of another model, placed a level too deep or half-downloaded is named with what to download where."""

    def VALIDATE_INPUTS(cls, folder=None):
        from ..loaders.explain import explain_diffusers_folder

        return explain_diffusers_folder(folder, family, loader, need) or True

    return classmethod(VALIDATE_INPUTS)


def seed_input():
    return ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Noise seed; the same seed gives the same image as the reference pipeline."})


def steps_input(default: int, tooltip: str):
    return ("INT", {"default": default, "min": 1, "max": 200, "tooltip": tooltip})


def cfg_input(default: float, tooltip: str):
    return ("FLOAT", {"default": default, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": tooltip})


def size_input(default: int, step: int, what: str):
    return ("INT", {"default": default, "min": step, "max": MAX_SIZE, "step": step,
                    "tooltip": f"{what} in pixels, a multiple of {step}."})


def size_validator(check: Callable[[int, int], None], step: int):
    """A VALIDATE_INPUTS classmethod for a width/height pair: ComfyUI (and the headless runner) call it before
    anything runs, so a wrong size is refused before any model loads. ComfyUI then skips its own range check
    for these two inputs, so the range is checked here too; a linked width or height is checked when it runs."""

    def VALIDATE_INPUTS(cls, width=None, height=None):
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, int) and not step <= value <= MAX_SIZE:
                return f"{name} {value} is outside [{step}, {MAX_SIZE}]"
        if isinstance(width, int) and isinstance(height, int):
            try:
                check(width, height)
            except LetterpressError as e:
                return str(e)
        return True

    return classmethod(VALIDATE_INPUTS)


def hosted(*handles):
    """Hand freshly loaded stages to the host (inside ComfyUI: each gets its ModelPatcher), as a node's outputs."""
    from ..loaders.host import get_host

    return tuple(None if h is None else get_host().wrap(h) for h in handles)


def require(handle, what: str, wire_from: str):
    """A clear error when an optional model output (e.g. a folder without a prompt enhancer) is wired."""
    if handle is None:
        raise LetterpressError(f"No {what} is loaded: {wire_from}.")
    return handle


def _taking(check, name: str):
    """`check` (cls, **values) as a VALIDATE_INPUTS classmethod whose signature names the one input `name`: ComfyUI
    passes, skips its own checks for, and reports a refusal once per input the signature names (with **kwargs:
    all of them, each repeating the message)."""
    import inspect

    def VALIDATE_INPUTS(cls, **values):
        return check(cls, **values)

    VALIDATE_INPUTS.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])
    return classmethod(VALIDATE_INPUTS)


class FileLoader:
    """Base of the single-file loader nodes: a file from one model folder + a weight dtype -> one stage.

    Subclasses set CATEGORY, DESCRIPTION, RETURN_TYPES, RETURN_NAMES, KIND (the model folder), INPUT (the
    widget's name), TOOLTIP (the file users have) and LOAD (loaders function: path, storage.Storage -> handle).
    """

    FUNCTION = "run"
    KIND = INPUT = TOOLTIP = ""
    FAMILY = ROLE = LOADER = ""  # what the file holds (loaders/explain.py's table) and the node's name, for messages
    LOAD = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {cls.INPUT: file_input(cls.KIND, cls.TOOLTIP), "weight_dtype": dtype_input()}}

    @classmethod
    def models(cls, inputs: dict) -> list[dict]:
        """The node's properties.models in a workflow that picks `inputs`: the picked file with its download URL and
        folder, as ComfyUI's templates write them (empty for a file the table of sources does not know)."""
        from ..loaders.explain import file_source

        source = file_source(cls.KIND, inputs.get(cls.INPUT))
        return [source.as_model()] if source else []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.INPUT and "VALIDATE_INPUTS" not in cls.__dict__:
            cls.VALIDATE_INPUTS = _taking(FileLoader.VALIDATE_INPUTS.__func__, cls.INPUT)

    @classmethod
    def VALIDATE_INPUTS(cls, **values):
        """Before anything loads: a file that is not there is named with where to get it. Each loader's copy says it
        takes its file input only (see _taking), so ComfyUI and the runner keep their own list check of the dtype
        and report a missing file once; the dtype is still checked here for direct callers."""
        from ..loaders.explain import explain_file

        dtype = values.get("weight_dtype")
        if isinstance(dtype, str) and dtype not in storage.CHOICES:
            return f"weight_dtype '{dtype}' is not one of {', '.join(storage.CHOICES)}"
        if not cls.FAMILY:
            return True
        return explain_file(cls.KIND, values.get(cls.INPUT), cls.FAMILY, cls.ROLE, cls.LOADER or "this loader") or True

    def run(self, *args, **kwargs):
        from ..loaders.detect import WrongModel
        from ..loaders.explain import file_hint
        from ..loaders.files import resolve

        values = dict(zip((self.INPUT, "weight_dtype"), args), **kwargs)  # ComfyUI passes keywords
        stored_as = weight_storage(values["weight_dtype"])
        try:
            handle = type(self).LOAD(resolve(self.KIND, values[self.INPUT]), stored_as)
        except WrongModel as e:
            if not self.FAMILY:
                raise
            raise WrongModel(f"{e} {file_hint(self.FAMILY, self.ROLE, values[self.INPUT])}") from None
        return hosted(handle)


def denoise_input():
    return ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                      "tooltip": "Below 1 keeps part of the input latent (image-to-image)."})


class VAEDecodeNode:
    """Base of the VAE Decode nodes: VAE + LATENT -> IMAGE through one family's `decode` stage."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    VAE_TYPE = ""
    DECODE = None
    LATENT_SCALE = 8  # image pixels per latent pixel, each side

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (cls.VAE_TYPE, {"tooltip": "The VAE from this family's loader."}),
                             "latent": ("LATENT", {"tooltip": "The latents to decode, from DiT Sample."})}}

    def run(self, vae, latent):
        from ..loaders.host import get_host

        samples = latent.get("samples") if isinstance(latent, dict) else None
        need = 0  # a bad latent: DECODE names the problem
        if isinstance(samples, torch.Tensor) and samples.dim() == 4:
            b, _, h, w = samples.shape
            need = working_memory.vae(vae, b, h * self.LATENT_SCALE, w * self.LATENT_SCALE)
        get_host().load(vae, memory_required=need)
        return (type(self).DECODE(vae, latent),)


class VAEEncodeNode:
    """Base of the VAE Encode nodes: VAE + IMAGE -> one family's LATENT through its `encode` stage."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    VAE_TYPE = ""
    ENCODE = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (cls.VAE_TYPE, {"tooltip": "The VAE from this family's loader."}),
                             "image": ("IMAGE", {"tooltip": "The picture to encode (for image-to-image or inpainting)."})}}

    def run(self, vae, image):
        from ..loaders.host import get_host

        ok = isinstance(image, torch.Tensor) and image.dim() == 4  # else ENCODE names the problem
        get_host().load(vae, memory_required=working_memory.vae(vae, *image.shape[:3]) if ok else 0)
        return (type(self).ENCODE(vae, image),)


class EmptyLatentNode:
    """Base of the Empty Latent nodes: width, height, batch -> one family's empty LATENT."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    STEP = 16
    EMPTY = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": size_input(1024, cls.STEP, "Image width"),
            "height": size_input(1024, cls.STEP, "Image height"),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images drawn at once, each from its own noise."}),
        }}

    def run(self, width, height, batch_size):
        return (type(self).EMPTY(width, height, batch_size),)
