"""The checkpoint view: what every reader of weights gives the loaders, whatever the file.

A view is a read-only mapping of tensor names to tensors (plain torch tensors, or `packed.Packed` for quantized
weights kept packed), read lazily one tensor at a time, plus what a loader asks of a file:
- `shape(key)`: a tensor's logical shape without reading it (configs are inferred from shapes);
- `file_of(key)`: the file it is read from, for messages;
- `release(key)`: the file's pages of a tensor that has been copied (quantized at load) may be dropped;
- `close()`: drop every mapping of the files (a failed load leaves none behind);
- `files`, `source` (the file or folder opened), `metadata` (the header's text fields) and `quantized` (whether
  weights come packed, so Linear layers must keep them packed).

Readers: weights.Checkpoint (safetensors), weights.ComfyQuantized (ComfyUI's quantized safetensors over a
Checkpoint), gguf_file.GgufCheckpoint, gguf_llm.LlamaCppNames (a GGUF language model under transformers' names),
a family's converted view (a DerivedView: its original names as diffusers names), and `Tensors` here (tensors already in memory:
converted state dicts, a trained LoRA). `view()` makes any mapping a view.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Iterator


class CheckpointView(Mapping):
    """A lazy, read-only state dict over weight files (module docstring). Subclasses give `__getitem__` and `names`;
    the rest has defaults that read the tensor (`shape`), name `source` (`file_of`) or do nothing."""

    files: list | tuple = ()
    source: str = ""
    metadata: Mapping = MappingProxyType({})
    quantized: bool = False

    @abstractmethod
    def __getitem__(self, key: str):
        ...

    @abstractmethod
    def names(self) -> Collection[str]:
        """The tensor names, in the order the view lists them."""

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, key) -> bool:  # without reading the tensor (Mapping's own would)
        return key in self.names()

    def shape(self, key: str) -> tuple:
        """The logical shape of tensor `key` (a packed weight's unpacked shape)."""
        return tuple(self[key].shape)

    def file_of(self, key: str) -> str:
        """The file tensor `key` is read from ('' when none: tensors in memory)."""
        return self.source

    def release(self, key: str) -> None:
        """Tensor `key` is no longer viewed (it was copied): the file's memory of it may be given back."""

    def close(self) -> None:
        """Drop every mapping of the files; the view reads nothing afterwards."""


class DerivedView(CheckpointView):
    """A view whose tensors are computed from another view's (renamed, converted, unpacked): it reads and closes
    the files of `base`, and names the file of a tensor by the first base tensor it is made from."""

    def __init__(self, base: CheckpointView):
        self.base = base
        self.files, self.source, self.metadata = base.files, base.source, base.metadata
        self.quantized = base.quantized

    def base_key(self, key: str) -> str:
        """The (first) key of `base` that tensor `key` is made from."""
        return key

    def file_of(self, key: str) -> str:
        return self.base.file_of(self.base_key(key))

    def close(self) -> None:
        self.base.close()


class Tensors(CheckpointView):
    """Tensors already in memory (a converted state dict, a LoRA trained in the graph) as a view, with the metadata a
    file would carry."""

    def __init__(self, tensors: Mapping, source: str = "", metadata: dict | None = None):
        self._tensors = tensors
        self.source = source
        self.files = [source] if source else []
        self.metadata = dict(metadata or {})

    def __getitem__(self, key: str):
        return self._tensors[key]

    def names(self) -> Collection[str]:
        return self._tensors.keys()

    def close(self) -> None:
        self._tensors = {}


def view(state: Mapping, source: str = "") -> CheckpointView:
    """`state` itself when it is a view, else its tensors as one (read from `source`, for messages)."""
    return state if isinstance(state, CheckpointView) else Tensors(state, source)
