"""Where each model comes from, and what a picked folder or file holds when it is not what a loader needs.

models() is the one table of download sources (README's "Model files" table, in code), made of the
registered families' SPEC.sources: every message that tells a user what to download and where to put it reads it. The `explain_*` functions return None when the pick is
usable and otherwise one sentence naming what is there, what the loader needs, and how to get it; the loader
nodes return it from VALIDATE_INPUTS (so ComfyUI and the headless runner refuse the prompt with it before
anything loads) and the loaders raise it at load time.
"""

from __future__ import annotations

import dataclasses
import json
import os

from . import families
from .host import get_host


@dataclasses.dataclass(frozen=True)
class Source:
    model: str  # what users call it
    family: str
    role: str  # "folder" for a whole model folder, else the stage a single file holds
    kind: str  # the models/ folder it goes under
    name: str  # its folder or file name there
    repo: str = ""  # the Hugging Face repository to download (the whole repository when `file` is empty)
    file: str = ""  # the file inside `repo` (single files)
    pipeline: str = ""  # a diffusers folder's model_index.json _class_name
    model_type: str = ""  # a transformers folder's config.json model_type
    # a single-file text encoder's tokenizer: the files of the family's diffusers repository (the first folder
    # source) that its loader reads from a folder beside the file named like it (text_encoders/<stem>/)
    companion: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """Where the file is downloaded from (as ComfyUI's templates write it), or the repository page."""
        if self.file:
            return f"{HUB}/{self.repo}/resolve/main/{self.file}"
        return f"{HUB}/{self.repo}" if self.repo else ""

    def as_model(self) -> dict:
        """A single file as an entry of a workflow node's properties.models (ComfyUI's templates' fields)."""
        return {"name": self.name, "url": self.url, "directory": self.kind}


HUB = "https://huggingface.co"


def models() -> tuple[Source, ...]:
    """Every registered family's sources (its SPEC.sources), family by family in registry order."""
    return tuple(s for spec in families.all() for s in spec.sources)


def _first_by(field: str) -> dict[str, Source]:
    """The first source of each value of `field` ("pipeline": a diffusers class, "model_type": a transformers one)."""
    found: dict[str, Source] = {}
    for s in models():
        if getattr(s, field):
            found.setdefault(getattr(s, field), s)
    return found


OTHER_PIPELINES = {"FluxPipeline": "FLUX.1", "Flux2Pipeline": "FLUX.2", "QwenImagePipeline": "Qwen-Image",
                   "StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "Stable Diffusion 3"}


def file_source(kind: str, name: str) -> Source | None:
    """The table's single file that a loader's pick `name` under models/`kind` is, if any: what --download fetches
    for it, and what a workflow's properties.models entry for that loader names (Source.as_model)."""
    return next((s for s in models() if s.file and s.kind == kind and s.name == name), None)


def family_of(pipeline_classes: tuple[str, ...]) -> str:
    pipelines = _first_by("pipeline")
    return next((pipelines[c].family for c in pipeline_classes if c in pipelines), "")


def sources(family: str, role: str = "folder") -> list[Source]:
    return [s for s in models() if s.family == family and s.role == role]


def _base(kind: str) -> str:
    """The folder of `kind` to put a model into: the one named like the kind (ComfyUI lists its legacy models/unet
    before models/diffusion_models), an existing one first."""
    folders = get_host().model_folders(kind)
    return min(folders, key=lambda f: (os.path.basename(f.rstrip(os.sep)) != kind, not os.path.isdir(f)))


def place(source: Source) -> str:
    """The path the file or folder of `source` belongs at."""
    return os.path.join(_base(source.kind), source.name)


def how_to_get(source: Source, command: bool = True) -> str:
    """'download REPO from Hugging Face into PATH' (with the hf command when `command`) for one source."""
    if not source.repo:
        return f"put the single file {source.name} into {_base(source.kind)}"
    if source.file:
        cmd = f" (hf download {source.repo} {source.file} --local-dir <folder>, then move it there)" if command else ""
        return f"download {source.file} from the Hugging Face repository {source.repo} to {place(source)}{cmd}"
    cmd = f" (hf download {source.repo} --local-dir {place(source)})" if command else ""
    return f"download the Hugging Face repository {source.repo} into {place(source)}{cmd}"


def where_to_get(family: str, role: str = "folder", name: str = "") -> str:
    """How to get the model `family` needs for `role`: the file or folder like `name` first, then another; for a
    single file also the whole folder, which holds the same stage."""
    own = sources(family, role)
    own.sort(key=lambda s: (not name or _stem(s.name) != _stem(name), not s.repo))
    ways = [how_to_get(s, i == 0) for i, s in enumerate(own[:2])]
    if role != "folder":
        whole = sources(family)
        if whole:
            ways.append(f"use the {families.title(family)} Folder Loader with the Hugging Face repository "
                        f"{whole[0].repo} downloaded into {place(whole[0])}")
    return "; or ".join(ways)


def _stem(name: str) -> str:
    base = os.path.basename(name.rstrip("/")).lower()
    for ext in (".safetensors", ".sft", ".gguf"):
        base = base.removesuffix(ext)
    return base


def needs(family: str, name: str = "") -> str:
    """A sentence: the folder this family's loader needs, and how to get it."""
    own = sources(family)
    what = " or ".join(dict.fromkeys(s.model for s in own)) if own else family
    return f"This loader needs {_article(what)} {what} folder: {where_to_get(family, 'folder', name)}."


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


# diffusers folders -------------------------------------------------------------------------------------------


def read_class(path: str, file: str, key: str) -> str | None:
    """`key` of the JSON object in path/file; None when the file is absent, '' when it cannot be read."""
    p = os.path.join(path, file)
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        return str(data.get(key, "")) if isinstance(data, dict) else ""
    except (OSError, ValueError):
        return ""


def _holds(path: str) -> str:
    """What a folder holds, as a phrase ('a <pipeline class> (<family title>)', 'a qwen3 model', ...)."""
    cls = read_class(path, "model_index.json", "_class_name")
    if cls:
        known = _first_by("pipeline").get(cls)
        label = families.title(known.family) if known else OTHER_PIPELINES.get(cls, "")
        return f"{_article(cls)} {cls}" + (f" ({label})" if label else "")
    kind = read_class(path, "config.json", "model_type")
    if kind:
        known = _first_by("model_type").get(kind)
        return f"a '{kind}' model" + (f" ({families.title(known.family)})" if known else "")
    return ""


def incomplete_download(path: str) -> bool:
    """An interrupted `hf download` leaves *.incomplete files in .cache/huggingface/download."""
    cache = os.path.join(path, ".cache", "huggingface", "download")
    for _root, _dirs, files in os.walk(cache):
        if any(f.endswith(".incomplete") for f in files):
            return True
    return False


def _nested(path: str, marker: str) -> str | None:
    """The subfolder of `path` (one or two levels down) that holds `marker`: a folder placed one level too deep."""
    try:
        subs = sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
    except OSError:
        return None
    for d in subs:
        if os.path.isfile(os.path.join(path, d, marker)):
            return d
    for d in subs:
        found = _nested(os.path.join(path, d), marker) if os.path.isdir(os.path.join(path, d)) else None
        if found and os.path.isfile(os.path.join(path, d, found, marker)):
            return f"{d}/{found}"
    return None


def _has_weights(path: str) -> bool:
    try:
        return any(f.endswith((".safetensors", ".gguf", ".sft")) for f in os.listdir(path))
    except OSError:
        return False


def _locate(name: str, kind: str, family: str) -> tuple[str | None, str, str | None]:
    """(path, label, problem) of folder `name` in the host's `kind` folders (models/diffusers, models/LLM): the
    problem says that no folder was chosen or that there is none of that name, and how to get the model."""
    bases = get_host().model_folders(kind)
    path = name if os.path.isabs(name) else next(
        (os.path.join(b, name) for b in bases if os.path.isdir(os.path.join(b, name))), None)
    label = os.path.basename(name.rstrip("/")) or name
    if not name:
        return None, label, f"no folder was chosen. {needs(family)}"
    if path is None or not os.path.isdir(path):
        where = " or ".join(b + ("" if os.path.isdir(b) else " (which does not exist)") for b in bases)
        return None, label, f"'{name}' is not a folder in {where}.{_elsewhere(name, kind)} {needs(family, name)}"
    return path, label, None


# Model folders a file or folder is often put into by mistake (ComfyUI's checkpoint loader reads checkpoints/).
OTHER_KINDS = ("checkpoints", "diffusers", "diffusion_models", "text_encoders", "vae", "LLM", "loras")


def _elsewhere(name: str, kind: str) -> str:
    """' It is in FOLDER: move it to BASE.' when `name` sits in another model folder (or models/ itself)."""
    if not name or os.path.isabs(name):
        return ""
    host = get_host()
    own = set(host.model_folders(kind))
    places = [f for k in OTHER_KINDS if k != kind for f in host.model_folders(k) if f not in own]
    for place in places + ([host.models_dir] if getattr(host, "models_dir", None) else []):
        if os.path.exists(os.path.join(place, name)):
            return f" It is in {place}: move it to {_base(kind)}."
    return ""


def explain_diffusers_folder(name: str, family: str, loader: str, need: tuple[str, ...] = ()) -> str | None:
    """None when models/diffusers/`name` is a folder of `family` holding the subfolders in `need`; else what is
    there, what `loader` needs and how to get it."""
    if not isinstance(name, str):
        return None  # a linked value: checked when it runs
    pipelines = tuple(dict.fromkeys(s.pipeline for s in sources(family)))
    path, label, missing = _locate(name, "diffusers", family)
    if missing:
        return missing
    cls = read_class(path, "model_index.json", "_class_name")
    if cls is None:
        deeper = _nested(path, "model_index.json")
        if deeper:
            return (f"{label} holds no model_index.json, but its subfolder {deeper} holds {_holds(os.path.join(path, deeper))}: "
                    f"the model was placed one level too deep. Move the contents of {os.path.join(path, deeper)} up into "
                    f"{path}, or pick '{name}/{deeper}' in {loader}.")
        if incomplete_download(path):
            return f"{label} is a download that did not finish (no model_index.json yet). Run the download again. " \
                   f"{needs(family, name)}"
        holds = _holds(path)
        if holds:
            return f"{label} holds {holds}, not a diffusers pipeline folder; {loader} takes a whole model folder. " \
                   f"{needs(family, name)}"
        try:
            empty = not os.listdir(path)
        except OSError:
            empty = False
        state = "is empty" if empty else "holds no model_index.json: the download is incomplete, or it is not a model folder"
        return f"{label} {state}. {needs(family, name)}"
    if cls not in pipelines:
        holds = _holds(path) if cls else "no readable pipeline class in its model_index.json"
        other = _first_by("pipeline").get(cls)
        other = families.title(other.family) if other else ""
        use = f"Use {_article(other)} {other} loader for this folder, or" if other else "Instead,"
        return (f"{label} holds {holds}; {loader} needs {_article(pipelines[0])} {' or '.join(pipelines)}. "
                f"{use} {where_to_get(family, 'folder', name)}.")
    missing = [sub for sub in need if not os.path.isdir(os.path.join(path, sub))]
    unfilled = [sub for sub in need if sub not in missing and os.path.isfile(os.path.join(path, sub, "config.json"))
                and not _has_weights(os.path.join(path, sub))]
    if missing or unfilled:
        gaps = [f"{s}/" for s in missing] + [f"the weights of {s}/" for s in unfilled]
        repo = next((s.repo for s in sources(family) if _stem(s.name) == _stem(name)), sources(family)[0].repo)
        return (f"{label} is {_holds(path)} but an incomplete download: it lacks {', '.join(gaps)}. Download the missing "
                f"files from {repo} into {path} (hf download {repo} --local-dir {path} fetches only what is missing).")
    return None


# transformers folders under models/LLM and single files --------------------------------------------------------


def explain_llm_folder(name: str, family: str, loader: str) -> str | None:
    """None when models/LLM/`name` is a complete folder of `family` (a transformers checkpoint); else what is there,
    what `loader` needs and how to get it."""
    if not isinstance(name, str):
        return None
    want = {s.model_type for s in sources(family)}
    path, label, missing = _locate(name, "LLM", family)
    if missing:
        return missing
    kind = read_class(path, "config.json", "model_type")
    if kind is None:
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return (f"{label} holds {_holds(path)}, a diffusers folder: those go under models/diffusers and load in "
                    f"their own Folder Loader. {needs(family, name)}")
        deeper = _nested(path, "config.json")
        if deeper:
            return (f"{label} holds no config.json, but its subfolder {deeper} holds {_holds(os.path.join(path, deeper))}: "
                    f"the model was placed one level too deep. Move the contents of {os.path.join(path, deeper)} up into "
                    f"{path}, or pick '{name}/{deeper}' in {loader}.")
        state = ("is a download that did not finish" if incomplete_download(path)
                 else "holds no config.json: the download is incomplete, or it is not a model folder")
        return f"{label} {state}. {needs(family, name)}"
    if kind not in want:
        return (f"{label} holds {_holds(path) if kind else 'a config.json without a model_type'}; {loader} needs "
                f"model_type {' or '.join(sorted(want))}. {needs(family, name)}")
    gaps = []
    if not _has_weights(path):
        gaps.append("its .safetensors weights")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        gaps.append("its tokenizer")
    if gaps:
        repo = next((s.repo for s in sources(family) if _stem(s.name) == _stem(name)), sources(family)[0].repo)
        return (f"{label} is {_holds(path)} but an incomplete download: it lacks {' and '.join(gaps)}. Download the "
                f"missing files from {repo} into {path} (hf download {repo} --local-dir {path}).")
    return None


def explain_file(kind: str, name: str, family: str, role: str, loader: str) -> str | None:
    """None when `name` is a file in the folders of `kind`; else where to get the file `loader` needs."""
    if not isinstance(name, str):
        return None
    bases = get_host().model_folders(kind)
    if name and ((os.path.isabs(name) and os.path.isfile(name)) or any(os.path.isfile(os.path.join(b, name)) for b in bases)):
        return None
    what = f"'{name}' is not a file in " + " or ".join(
        b + ("" if os.path.isdir(b) else " (which does not exist)") for b in bases) if name else "No file was chosen"
    stage = f"{families.title(family)} {ROLE_NAMES.get(role, role)}"
    return f"{what}.{_elsewhere(name, kind)} {loader[:1].upper() + loader[1:]} needs {_article(stage)} {stage} " \
           f"file: {where_to_get(family, role, name)}."


ROLE_NAMES = {"dit": "DiT", "vae": "VAE", "text_encoder": "text encoder", "prompt_enhancer": "prompt enhancer"}


def file_hint(family: str, role: str, name: str = "") -> str:
    """A sentence for a single file of the wrong model: how to get the right one."""
    return f"To get the {families.title(family)} {ROLE_NAMES.get(role, role)}: {where_to_get(family, role, name)}."


def readme_table() -> str:
    """README's "Model files" table, from models() (the LoRA row, which has no source, is written under it by hand)."""
    rows = ["| model | folder under `models/` | name | download from |", "|---|---|---|---|"]
    for s in sorted(models(), key=lambda s: (families.REGISTERED.index(s.family), s.role != "folder")):
        name = s.name + ("/" if s.role == "folder" else "")
        source = (f"`{s.repo}` ([`{s.file}`]({s.url}))" if s.file else f"[`{s.repo}`]({s.url})") if s.repo else ""
        rows.append(f"| {s.model} | `{s.kind}/` | `{name}` | {source} |")
    return "\n".join(rows)
