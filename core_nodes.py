"""Standalone stand-ins for the few ComfyUI core nodes the shipped workflows use (LoadImage, SaveImage,
PreviewImage, PreviewAny, SetLatentNoiseMask, PrimitiveInt, PrimitiveString, PrimitiveStringMultiline). They are
used by the headless runner only; inside ComfyUI the real core nodes run. Like ComfyUI's SaveImage, images are written as PNG with the prompt (and
workflow) in text chunks."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from .loaders.errors import LetterpressError

from .loaders.host import get_host


def _png_info(prompt, extra_pnginfo) -> PngInfo:
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for k, v in (extra_pnginfo or {}).items():
        info.add_text(k, json.dumps(v))
    return info


def expand_prefix(prefix: str, width: int = 0, height: int = 0) -> str:
    """ComfyUI's filename_prefix variables: %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%."""
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix


def prefix_problem(prefix: str) -> str | None:
    """Why a filename_prefix cannot be used (None if it can): it must name a file inside the output folder."""
    path = os.path.normpath(expand_prefix(prefix))
    if "\0" in prefix or os.path.isabs(path) or path == ".." or path.startswith(".." + os.sep) or prefix.endswith("/"):
        return (f"filename_prefix '{prefix}' must name a file inside the output folder (no leading /, no .. "
                "above it, not ending in /); e.g. letterpress/poster.")
    return None


def save_images(images: torch.Tensor, folder: str, prefix: str, prompt=None, extra_pnginfo=None) -> list[str]:
    """Write each image as <prefix>_NNNNN_.png, never replacing a file that exists."""
    problem = prefix_problem(prefix)
    if problem:
        raise LetterpressError(problem)
    sub, base = os.path.split(os.path.normpath(expand_prefix(prefix, images.shape[2], images.shape[1])))
    target = os.path.join(folder, sub)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        raise LetterpressError(f"Cannot create the output folder {target}: {e.strerror}. Choose a writable --output-dir.")
    if not os.access(target, os.W_OK):
        raise LetterpressError(f"The output folder {target} is not writable. Choose a writable --output-dir.")
    pattern = re.compile(re.escape(base) + r"_(\d{5})_\.png$")
    counter = max([int(m.group(1)) for f in os.listdir(target) if (m := pattern.match(f))], default=0) + 1
    written = []
    for image in images:
        arr = np.clip(255.0 * image.cpu().float().numpy(), 0, 255).astype(np.uint8)
        while True:
            path = os.path.join(target, f"{base}_{counter:05}_.png")
            counter += 1
            try:
                f = open(path, "xb")  # exclusive create: an existing file is never overwritten
            except FileExistsError:
                continue
            try:
                with f:
                    Image.fromarray(arr).save(f, format="PNG", pnginfo=_png_info(prompt, extra_pnginfo), compress_level=4)
            except BaseException as e:
                os.remove(path)  # never leave a partly written image behind
                if isinstance(e, OSError):
                    raise LetterpressError(f"Cannot write {path}: {e.strerror or e}. Free space or choose another --output-dir.")
                raise
            break
        written.append(path)
    return written


class SaveImage:
    CATEGORY = "image"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="ComfyUI"):  # before anything runs, so no image is made in vain
        return prefix_problem(filename_prefix) or True

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        paths = save_images(images, get_host().output_dir, filename_prefix, prompt, extra_pnginfo)
        return {"ui": {"images": [{"filename": os.path.basename(p), "path": p} for p in paths]}}


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="preview", prompt=None, extra_pnginfo=None):
        folder = os.path.join(tempfile.gettempdir(), "letterpress_preview")
        paths = save_images(images, folder, "preview", prompt, extra_pnginfo)
        return {"ui": {"images": [{"filename": os.path.basename(p), "path": p} for p in paths]}}


class LoadImage:
    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"image_upload": True})}}

    @classmethod
    def IS_CHANGED(cls, image):
        path = cls._path(image)
        return f"{os.path.getmtime(path)}:{os.path.getsize(path)}" if os.path.exists(path) else "missing"

    @classmethod
    def VALIDATE_INPUTS(cls, image=None):  # a missing picture is named before any model loads
        if isinstance(image, str) and not os.path.exists(cls._path(image)):
            return f"Image {image} was not found in {get_host().input_dir}. Put it there or pass a full path."
        return True

    @staticmethod
    def _path(image: str) -> str:
        return image if os.path.isabs(image) else os.path.join(get_host().input_dir, image)

    def load_image(self, image):
        path = self._path(image)
        if not os.path.exists(path):
            raise LetterpressError(f"Image {image} was not found in {get_host().input_dir}. Put it there or pass a full path.")
        frames = []
        try:
            img = Image.open(path)
            # every frame of an animation (a GIF, WebP or TIFF) as a batch, as ComfyUI loads them; an MPO's
            # extra frames are other views of the photo, so only its first
            for frame in ([img] if img.format == "MPO" else ImageSequence.Iterator(img)):
                rgba = ImageOps.exif_transpose(frame).convert("RGBA")
                if frames and rgba.size != frames[0].shape[1::-1]:
                    continue  # frames of another size cannot join the batch (ComfyUI skips them too)
                frames.append(np.asarray(rgba).astype(np.float32) / 255.0)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise LetterpressError(f"Image {path} is not a readable image ({e}): give a PNG, JPEG or WebP file.") from None
        t = torch.from_numpy(np.stack(frames))
        return (t[..., :3], 1.0 - t[..., 3])


class SetLatentNoiseMask:
    """ComfyUI's inpainting mask on a LATENT: the sampler redraws where the mask is 1 and keeps the rest."""

    CATEGORY = "latent/inpaint"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)


class PrimitiveInt:
    """ComfyUI's Int primitive: one number wired into several widget inputs (a width that two nodes share)."""

    CATEGORY = "utils/primitive"
    RETURN_TYPES = ("INT",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True})}}

    def execute(self, value):
        return (value,)


class PrimitiveString:
    """ComfyUI's String primitive: one text wired into several inputs (a prompt that Text Encode and Text Accuracy
    share)."""

    CATEGORY = "utils/primitive"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {})}}

    def execute(self, value):
        return (value,)


class PrimitiveStringMultiline(PrimitiveString):
    """ComfyUI's String (Multiline) primitive: the same, typed in a text box."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"multiline": True})}}


class PreviewAny:
    """ComfyUI's Preview Any: shows a value (here a STRING, such as an enhanced prompt) as text on the node."""

    CATEGORY = "utils"
    RETURN_TYPES = ()
    FUNCTION = "main"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("*", {})}}

    def main(self, source=None):
        if source is None or isinstance(source, (str, int, float, bool)):
            value = str(source)  # as ComfyUI shows them: None, True, 3
        else:
            try:
                value = json.dumps(source)
            except (TypeError, ValueError):
                value = str(source)
        return {"ui": {"text": (value,)}}


CORE_NODES = {"SaveImage": SaveImage, "PreviewImage": PreviewImage, "PreviewAny": PreviewAny, "LoadImage": LoadImage,
              "SetLatentNoiseMask": SetLatentNoiseMask, "PrimitiveInt": PrimitiveInt,
              "PrimitiveString": PrimitiveString, "PrimitiveStringMultiline": PrimitiveStringMultiline}
