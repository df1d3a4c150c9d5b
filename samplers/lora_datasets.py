"""Training datasets as people have them: a flat folder of images with same-named .txt captions (a.png + a.txt),
DiffSynth-Studio's metadata.csv (columns image, prompt) beside the images, kohya's `N_name/` folders (N repeats per
epoch; an image without a caption file is captioned with the folder's name, as kohya does), or an IMAGE batch with
one caption per line. An image that has no caption in a layout that needs one is named in the error."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

import torch

from ..loaders.errors import LetterpressError
from .lora_plan import ItemTable, expand

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # kohya's sd-scripts reads either (its --caption_extension)
METADATA = "metadata.csv"  # DiffSynth-Studio's --dataset_metadata_path file
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class TrainingDataset:
    """Images (each (1, H, W, 3) in 0..1, any size), their captions and their repeats per epoch."""

    images: list
    captions: list
    source: str = ""
    repeats: list | None = None  # per image, its repeats per epoch (kohya's N_name folders); None: once each

    def __len__(self) -> int:
        return len(self.images)

    def repeated(self, times: int) -> TrainingDataset:
        """Every image `times` times more often per epoch (DiffSynth-Studio's --dataset_repeat)."""
        return TrainingDataset(self.images, self.captions, self.source,
                               [r * times for r in (self.repeats or [1] * len(self))])


def prepare(dataset: TrainingDataset, settings) -> tuple[TrainingDataset, ItemTable]:
    """The items to encode for a run (the dataset's, then their mirrored and caption-dropped variants, the trigger
    word in the captions) and the table the run's steps pick them by."""
    images, captions, table = expand(dataset.images, dataset.captions, dataset.repeats or [1] * len(dataset),
                                     settings.flip, settings.caption_dropout, settings.trigger_word)
    return TrainingDataset(images, captions, dataset.source), table


def load_image(path: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3) \
            .float().div(255)[None]


def _images_in(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))


def _caption_file(folder: str, name: str) -> str | None:
    stem = os.path.join(folder, os.path.splitext(name)[0])
    return next((stem + ext for ext in CAPTION_EXTENSIONS if os.path.isfile(stem + ext)), None)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _uncaptioned(folder: str, names: list[str], how: str) -> LetterpressError:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return LetterpressError(f"{len(names)} image(s) in {folder} have no caption: {shown}. {how}")


def dataset_from_folder(folder: str) -> TrainingDataset:
    """The dataset in `folder`: its metadata.csv when it has one, else its kohya N_name/ folders when it has them,
    else its images with their same-named .txt captions."""
    if not os.path.isdir(folder):
        raise LetterpressError(f"The dataset folder {folder} does not exist: put a folder of images and same-named "
                               ".txt captions under ComfyUI's input folder and give its name.")
    if os.path.isfile(os.path.join(folder, METADATA)):
        return _from_metadata(folder)
    kohya = sorted(n for n in os.listdir(folder) if KOHYA_FOLDER.match(n) and os.path.isdir(os.path.join(folder, n)))
    if kohya:
        return _from_kohya(folder, kohya)
    names = _images_in(folder)
    if not names:
        raise LetterpressError(f"The dataset folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), no "
                               f"{METADATA} and no kohya N_name folders.")
    missing = [n for n in names if _caption_file(folder, n) is None]
    if missing:
        raise _uncaptioned(folder, missing, "Put each image's caption in a .txt file of the same name (a.png + "
                                            "a.txt; an empty file trains it uncaptioned), or list the images in a "
                                            f"{METADATA} (columns image, prompt).")
    return TrainingDataset([load_image(os.path.join(folder, n)) for n in names],
                           [_read(_caption_file(folder, n)) for n in names], folder)


def _from_metadata(folder: str) -> TrainingDataset:
    """DiffSynth-Studio's layout: metadata.csv with an `image` column (paths relative to the folder) and a `prompt`
    column."""
    path = os.path.join(folder, METADATA)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    if not rows or "image" not in columns or "prompt" not in columns:
        raise LetterpressError(f"{path} needs the columns image and prompt (DiffSynth-Studio's metadata.csv) and a row "
                               f"per image; it has {', '.join(columns) or 'no rows'}.")
    missing = [r["image"] for r in rows if not os.path.isfile(os.path.join(folder, r["image"] or ""))]
    if missing:
        raise LetterpressError(f"{path} lists images that are not in {folder}: {', '.join(missing[:5])}. Fix the "
                               "image column (paths relative to the folder) or add the files.")
    uncaptioned = [r["image"] for r in rows if r["prompt"] is None]
    if uncaptioned:
        raise _uncaptioned(folder, uncaptioned, f"Give each row of {METADATA} its prompt.")
    return TrainingDataset([load_image(os.path.join(folder, r["image"])) for r in rows],
                           [r["prompt"].strip() for r in rows], folder)


def _from_kohya(folder: str, subfolders: list[str]) -> TrainingDataset:
    """kohya's layout: `N_name/` folders, each image N times per epoch, captioned by its .txt (or .caption) file,
    else by the folder's name after N_ (kohya's class tokens)."""
    images, captions, repeats = [], [], []
    for sub in subfolders:
        times, name = KOHYA_FOLDER.match(sub).groups()
        path = os.path.join(folder, sub)
        for n in _images_in(path):
            images.append(load_image(os.path.join(path, n)))
            caption = _caption_file(path, n)
            captions.append(_read(caption) if caption else name.strip())
            repeats.append(int(times))
    if not images:
        raise LetterpressError(f"The kohya folders in {folder} ({', '.join(subfolders)}) hold no images.")
    if 0 in repeats:
        raise LetterpressError(f"A kohya folder in {folder} repeats its images 0 times: name it 1_name or more.")
    return TrainingDataset(images, captions, folder, repeats)


def dataset_from_images(images: torch.Tensor, captions: str) -> TrainingDataset:
    """An IMAGE batch and its captions, one per line (a single line captions every image)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise LetterpressError("images is not an IMAGE batch: wire Load Image (or a batch of images).")
    lines = [c.strip() for c in captions.split("\n")] if captions.strip() else [""]
    lines = [c for c in lines if c] or [""]
    if len(lines) == 1:
        lines = lines * images.shape[0]
    if len(lines) != images.shape[0]:
        raise LetterpressError(f"{images.shape[0]} images but {len(lines)} caption lines: give one caption per line, "
                               "one per image (or a single line for all).")
    return TrainingDataset([img[None, ..., :3].float() for img in images], lines, "images")
