"""Finding model files and folders in the host's model directories."""

from __future__ import annotations

import json
import os

from .host import LetterpressError, get_host

WEIGHT_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def list_files(kind: str) -> list[str]:
    """Weight files under the folders of `kind`, as paths relative to their folder (ComfyUI's convention)."""
    found: set[str] = set()
    for folder in get_host().model_folders(kind):
        if not os.path.isdir(folder):
            continue
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for f in files:
                if f.lower().endswith(WEIGHT_EXTENSIONS):
                    found.add(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
    return sorted(found)


def list_diffusers_folders(class_names: tuple[str, ...] = ()) -> list[str]:
    """Folders under models/diffusers that hold a model_index.json (optionally of these pipeline classes)."""
    found: set[str] = set()
    for folder in get_host().model_folders("diffusers"):
        if not os.path.isdir(folder):
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            if "model_index.json" in files:
                if not class_names or pipeline_class(root) in class_names:
                    found.add(os.path.relpath(root, folder).replace(os.sep, "/"))
                dirs[:] = []
    return sorted(found)


def list_subfolders(kind: str, marker: str = "config.json") -> list[str]:
    """Folders under `kind` that hold `marker` (transformers checkpoints, tokenizers)."""
    found: set[str] = set()
    for folder in get_host().model_folders(kind):
        if not os.path.isdir(folder):
            continue
        for root, dirs, files in os.walk(folder, followlinks=True):
            if marker in files:
                found.add(os.path.relpath(root, folder).replace(os.sep, "/"))
                dirs[:] = []
    return sorted(found)


def pipeline_class(folder: str) -> str:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            return json.load(f).get("_class_name", "")
    except (OSError, ValueError):
        return ""


def resolve(kind: str, name: str) -> str:
    """The full path of `name` inside the folders of `kind`; a clear error when it is not there."""
    if not name:
        raise LetterpressError(f"No {kind} file was chosen. Put one into models/{kind}/ and pick it in the loader.")
    if os.path.isabs(name) and os.path.exists(name):
        return name
    folders = get_host().model_folders(kind)
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    raise LetterpressError(
        f"'{name}' was not found in the {kind} model folders ({', '.join(folders)}). "
        f"Put the file there (or fix the name in the workflow) and refresh."
    )


def check_pipeline(folder: str, classes: tuple[str, ...], model: str, repo: str) -> None:
    """A clear error when `folder` is not a diffusers folder of one of `classes`."""
    found = pipeline_class(folder)
    if found not in classes:
        raise LetterpressError(
            f"{os.path.basename(folder.rstrip(os.sep))} is not {model} folder ({found or 'no model_index.json'}). "
            f"Pick the {repo} folder under models/diffusers."
        )


def component(path: str, sub: str, classes: tuple[str, ...], model: str, repo: str) -> str:
    """`path/sub` when `path` is a whole pipeline folder (checked to be `model`'s), else `path` itself."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model_index.json")):
        check_pipeline(path, classes, model, repo)
        path = os.path.join(path, sub)
        if not os.path.isdir(path):
            raise LetterpressError(
                f"{os.path.basename(os.path.dirname(path))} lacks its {sub}/ folder: the download is incomplete. "
                f"Download {sub}/ from {repo} into it."
            )
    return path
