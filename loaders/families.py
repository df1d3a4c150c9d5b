"""The model families of the pack: one record (FamilySpec) per family, registered here by one line.

A family is a key ("ernie_image") and the files named after it: loaders/<key>.py (which holds its SPEC, one block
near the top), samplers/<key>.py and nodes/<key>.py (more files may start with the key, e.g.
loaders/ernie_vl_experts.py). The shared modules (detection, download sources and messages, conditioning checks,
working memory, LoRA names, the node list, text reading) read what they need of a family from its SPEC, through
get() and all(); none of them names a family. Adding a family: write its three files, give loaders/<key>.py a
SPEC, and add its key to REGISTERED.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

REGISTERED = ("ernie_image", "ovis_image", "glm_image", "ernie_vl")  # the one line a new family adds to


@dataclasses.dataclass(frozen=True)
class Signature:
    """Tensor-name fragments that must all appear in some key of a checkpoint of `role` (detect.describe)."""
    role: str  # "dit", "ar", "vae", "text_encoder", ...
    name: str  # what it is called in messages ("ERNIE-Image DiT")
    fragments: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TextReader:
    """A family whose loaded model reads text in images for the Read Text node (samplers/<key>.py gives
    `vl_generate` and `parse_boxes`)."""
    io_type: str  # the ComfyUI type of the loaded model, which Read Text's optional input takes


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    key: str  # "ernie_image": the names of its files
    title: str  # "ERNIE-Image": what users call it
    class_stem: str  # "ErnieImage": its node classes are Letterpress<class_stem>...
    sources: tuple = ()  # explain.Source rows: where its folders and single files come from (the first folder
    #                      source is the one to download whole); their pipeline / model_type tell its folders
    signatures: tuple[Signature, ...] = ()  # its own architectures, tried before the shared ones (detect.py)
    components: tuple[str, ...] = ()  # the shared architectures its stages use (detect.COMPONENTS ids)
    encode_node: str = ""  # the node that makes its conditioning, as the editor shows it
    latent_nodes: str = ""  # the nodes that make its latents
    dit_factor: float | None = None  # DiT activations per token of width (samplers/working_memory.py); None: no DiT
    lora_plan: Callable | None = None  # (dit module, LoRA layer names) -> plan converting its original names
    text_reader: TextReader | None = None
    # (role, a single file's path) -> the folders its loader looks for the file's tokenizer in, in that order
    # (llm.find_tokenizer_folders); `run --download` asks it before fetching a source's companion. Needed by a family
    # with a single-file source that has a companion.
    tokenizer_folders: Callable[[str, str], list[str]] | None = None

    @property
    def pipelines(self) -> tuple[str, ...]:
        """The diffusers pipeline classes of its folders."""
        return tuple(dict.fromkeys(s.pipeline for s in self.sources if s.pipeline))

    @property
    def model_types(self) -> tuple[str, ...]:
        """The transformers model_type of its folders."""
        return tuple(dict.fromkeys(s.model_type for s in self.sources if s.model_type))

    def folder(self, name: str | None = None):
        """Its folder source (an explain.Source) named `name`; None: the first, the one downloaded whole."""
        for s in self.sources:
            if s.role == "folder" and (name is None or s.name == name):
                return s
        raise KeyError(f"{self.title} has no folder source '{name}' (its SPEC.sources in loaders/{self.key}.py)")


def get(key: str) -> FamilySpec:
    """The SPEC of loaders/<key>.py (imported relative to this package, which ComfyUI names as it likes)."""
    if key not in REGISTERED:
        raise KeyError(f"'{key}' is not a registered model family ({', '.join(REGISTERED)}): add it to "
                       "loaders/families.py REGISTERED.")
    if key not in _SPECS:
        _SPECS[key] = importlib.import_module(f".{key}", __package__).SPEC
    return _SPECS[key]


_SPECS: dict[str, FamilySpec] = {}


def all() -> list[FamilySpec]:  # noqa: A001  (the registry's own name for "every family")
    return [get(k) for k in REGISTERED]


def text_reader() -> FamilySpec | None:
    """The family whose model reads text for the Read Text node (SPEC.text_reader), if one is registered."""
    return next((spec for spec in all() if spec.text_reader is not None), None)


def title(key: str) -> str:
    """The family's title, or the key itself when it is not registered (a message must not fail)."""
    return get(key).title if key in REGISTERED else key
