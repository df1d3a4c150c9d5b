"""Finding model files and folders in the host's model directories."""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterator

from .errors import LetterpressError
from .host import get_host

WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
# one shard of a sharded checkpoint (Hugging Face naming): listed once, as its first shard, and loaded whole
SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")


def list_files(kind: str) -> list[str]:
    """Weight files under the folders of `kind`, as paths relative to their folder (ComfyUI's convention)."""
    found: set[str] = set()
    for folder in get_host().model_folders(kind):
        if not os.path.isdir(folder):
            continue
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for f in files:
                shard = SHARD.match(f)
                if f.lower().endswith(WEIGHT_EXTENSIONS) and not (shard and int(shard.group("i")) != 1):
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


def list_diffusers_choices(class_names: tuple[str, ...]) -> list[str]:
    """What a folder loader offers: the folders of these pipeline classes first, then every other folder under
    models/diffusers (other pipelines, half-downloaded folders, models placed a level too deep), so a workflow's
    folder stays pickable and the loader can say what it holds instead of the editor showing an empty list."""
    own = set(list_diffusers_folders(class_names))
    others = set(list_diffusers_folders()) - own
    for folder in get_host().model_folders("diffusers"):
        with contextlib.suppress(OSError):
            others.update(d for d in os.listdir(folder)
                          if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)) and d not in own)
    return sorted(own) + sorted(others)


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


def list_model_folders(kind: str, own: list[str]) -> list[str]:
    """`own` (a loader's folders of its model) first, then every other model folder and top-level folder under
    `kind`, so a picked folder of another model stays pickable and its loader can say what it holds."""
    others = set(list_subfolders(kind)) - set(own)
    for folder in get_host().model_folders(kind):
        with contextlib.suppress(OSError):
            others.update(d for d in os.listdir(folder)
                          if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)) and d not in own)
    return list(own) + sorted(others)


@contextlib.contextmanager
def readable(path: str) -> Iterator[None]:
    """Turn the OS refusing to read `path` (or a file or folder in it) into a clear error."""
    try:
        yield
    except PermissionError as e:
        raise LetterpressError(
            f"cannot read {e.filename or path}: permission denied. Give your user read access to the model files "
            "and their folders (e.g. chmod -R u+rX on the model folder)."
        ) from None


def read_json(path: str, what: str = "") -> dict:
    """The JSON object in `path`; a clear error when it is missing, unreadable, not JSON or not an object."""
    label = f"{what}: {path}" if what else path
    try:
        with readable(path), open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LetterpressError(f"{label} is missing. The folder is incomplete; download it again.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LetterpressError(f"{label} is not valid JSON ({e}): download it again.") from None
    if not isinstance(data, dict):
        raise LetterpressError(f"{label} holds a JSON {type(data).__name__}, not an object: download it again.")
    return data


def scheduler_settings(component: str, defaults: dict, what: str) -> dict:
    """`defaults` updated by the scheduler/scheduler_config.json of the diffusers folder that holds the `component`
    folder (its keys among the defaults' only); the defaults alone for a single file or a folder without one."""
    settings = dict(defaults)
    if os.path.isdir(component):
        path = os.path.join(os.path.dirname(component.rstrip(os.sep)), "scheduler", "scheduler_config.json")
        if os.path.exists(path):
            found = read_json(path, what)
            settings.update({k: found[k] for k in defaults if k in found})
    return settings


def pipeline_class(folder: str) -> str:
    """The pipeline class the folder's model_index.json names ('' when there is none to read)."""
    try:
        return str(read_json(os.path.join(folder, "model_index.json")).get("_class_name", ""))
    except (LetterpressError, OSError):
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
    with readable(folder):
        names = os.listdir(folder) if os.path.isdir(folder) else []
    index = os.path.join(folder, "model_index.json")
    found = str(read_json(index).get("_class_name", "")) if "model_index.json" in names else ""
    if found not in classes:
        from .explain import explain_diffusers_folder, family_of

        family = family_of(classes)
        problem = family and explain_diffusers_folder(folder, family, f"this {model[model.index(' ') + 1:]} loader")
        raise LetterpressError(problem or (
            f"{os.path.basename(folder.rstrip(os.sep))} is not {model} folder ({found or 'no model_index.json'}). "
            f"Pick the {repo} folder under models/diffusers."
        ))


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
