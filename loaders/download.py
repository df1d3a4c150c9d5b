"""`run --download`: what a workflow's loaders would read that the models folder lacks, fetched from the Hugging Face
Hub with huggingface_hub (resumable: an interrupted file goes on from its `.incomplete` part; with progress bars).

Only the files the loaders read: a single file by itself; for a single-file text encoder the tokenizer files of
the model's diffusers repository (the Source's `companion`), placed beside the file as its loader looks for them
(text_encoders/<stem>/); for a folder the subfolders its node reads (the node's PARTS), their configs, weights and
tokenizer files, without other precisions (diffusers' `.fp16.` variants), other formats or the repository's
documents. Where each comes from is loaders/explain.py's models().
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import sys

from . import families
from .errors import LetterpressError
from .explain import (
    Source,
    explain_diffusers_folder,
    explain_file,
    explain_llm_folder,
    file_source,
    how_to_get,
    incomplete_download,
    place,
    read_class,
    sources,
)
from .files import pipeline_class
from .llm import holds_tokenizer

# Inside a folder part: configs, weights and every file a tokenizer or processor is made of.
PART_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
# diffusers' other precisions of the same weights (name.fp16.safetensors, name.fp16-00001-of-00002.safetensors,
# name.safetensors.index.fp16.json): the loaders read every .safetensors of a folder, so these must stay out.
VARIANTS = tuple(f"*.{v}{sep}*" for v in ("fp16", "bf16", "fp32", "fp8") for sep in (".", "-"))
STAGING = ".letterpress-download"  # under a model folder: a single file's download until it is complete


@dataclasses.dataclass(frozen=True)
class Fetch:
    """Files of one repository: `patterns` fetched into `local_dir` in the repository's layout; with `flatten`,
    each file is then moved into `flatten` (a single file's path, or the tokenizer folder beside it)."""

    source: Source
    repo: str
    patterns: tuple[str, ...]
    local_dir: str
    flatten: str = ""
    what: str = ""

    def __str__(self) -> str:
        return f"{self.what or self.source.model} from {self.repo}"


def plan(wf: dict, nodes: dict, order: list[str]) -> dict[str, list[Fetch]]:
    """node id -> what its loader would read that is not there and that the sources table says where to get."""
    wanted = {}
    for nid in order:
        cls = nodes.get(wf[nid].get("class_type"))
        inputs = {k: v for k, v in wf[nid].get("inputs", {}).items() if isinstance(v, (str, bool))}
        found = _single_file(cls, inputs) if getattr(cls, "INPUT", "") else _folder(cls, inputs)
        if found:
            wanted[nid] = found
    return wanted


def _single_file(cls, inputs: dict) -> list[Fetch]:
    name, family = inputs.get(cls.INPUT), getattr(cls, "FAMILY", "")
    source = file_source(cls.KIND, name)
    if source is None or not family:
        return []
    out = []
    if explain_file(cls.KIND, name, family, cls.ROLE, cls.LOADER) is not None:
        out.append(Fetch(source, source.repo, (source.file,), _staging(source), flatten=place(source)))
    if source.companion and not _has_tokenizer(source):
        folder = sources(family)[0]
        out.append(Fetch(source, folder.repo, source.companion, _staging(source, folder.repo),
                         flatten=os.path.splitext(place(source))[0], what=f"the tokenizer of the {source.model}"))
    return out


def _staging(source: Source, repo: str = "") -> str:
    return os.path.join(os.path.dirname(place(source)), STAGING, (repo or source.repo).replace("/", "--"))


def _has_tokenizer(source: Source) -> bool:
    """A tokenizer in one of the folders the single file's loader looks in (its family's tokenizer_folders)."""
    return any(holds_tokenizer(f) for f in families.get(source.family).tokenizer_folders(source.role, place(source)))


def _folder(cls, inputs: dict) -> list[Fetch]:
    parts = getattr(cls, "PARTS", None)
    name = inputs.get("folder")
    source = next((s for s in sources(getattr(cls, "FAMILY", "")) if s.name == name), None)
    if parts is None or source is None:
        return []
    for flag, extra in getattr(cls, "PARTS_IF", {}).items():
        parts += extra if inputs.get(flag) else ()
    path = place(source)
    if source.kind == "diffusers":
        if pipeline_class(path) not in ("", source.pipeline):
            return []  # another model's folder under this name: validation says so, nothing is written into it
        missing = explain_diffusers_folder(name, source.family, "", parts) is not None
        patterns = ("model_index.json",) + tuple(f"{p}/{f}" for p in parts for f in PART_FILES)
    else:
        kind = read_class(path, "config.json", "model_type")  # None: no config yet; "": unreadable (re-fetched)
        if kind and kind != source.model_type:
            return []
        missing = explain_llm_folder(name, source.family, "") is not None
        patterns = PART_FILES
    if not missing and not incomplete_download(path):
        return []
    return [Fetch(source, source.repo, patterns, path)]


# Fetching ----------------------------------------------------------------------------------------------------


def fetch(wanted: dict[str, list[Fetch]], progress: bool = True) -> None:
    """Download everything `plan` found, one repository's files at a time; a failure is a LetterpressError saying
    which repository and file, why, and what to do."""
    import huggingface_hub

    if not progress:
        huggingface_hub.utils.disable_progress_bars()
    for item in dict.fromkeys(f for fs in wanted.values() for f in fs):  # two nodes may need the same file
        print(f"Downloading {item} into {item.flatten or item.local_dir}", file=sys.stderr)
        try:
            _fetch(item)
        except Exception as e:  # noqa: BLE001 (each failure becomes one sentence; an unknown one is raised as it is)
            raise LetterpressError(explain_failure(e, item)) from None


def _fetch(item: Fetch) -> None:
    from huggingface_hub import snapshot_download

    os.makedirs(item.local_dir, exist_ok=True)
    snapshot_download(item.repo, allow_patterns=list(item.patterns), ignore_patterns=list(VARIANTS),
                      local_dir=item.local_dir)
    if not item.flatten:
        return
    got = [os.path.join(root, f) for root, dirs, files in os.walk(item.local_dir)
           for f in files if not os.path.relpath(root, item.local_dir).startswith(".cache")]
    if not got:
        raise FileNotFoundError(f"{item.repo} holds none of {', '.join(item.patterns)}")
    if item.patterns == (item.source.file,):  # a single file, renamed to the name the workflow picks
        os.makedirs(os.path.dirname(item.flatten), exist_ok=True)
        os.replace(got[0], item.flatten)
    else:  # a tokenizer folder beside the file, flat
        os.makedirs(item.flatten, exist_ok=True)
        for path in got:
            os.replace(path, os.path.join(item.flatten, os.path.basename(path)))
    shutil.rmtree(item.local_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(item.local_dir))  # the staging folder, once nothing else is in it


def explain_failure(e: Exception, item: Fetch) -> str:
    """One sentence for a failed download: what was being fetched, why it failed, what to do."""
    from huggingface_hub import constants, errors

    what = f"Downloading {item} failed: "
    by_hand = f" Or {how_to_get(item.source)}." if not item.what else ""
    again = " Run the same command again: the download goes on where it stopped."
    if isinstance(e, errors.GatedRepoError):
        return (what + f"{item.repo} is a gated repository. Accept its conditions on {constants.ENDPOINT}/{item.repo} "
                "while logged in, then log in here (hf auth login) or set HF_TOKEN, and run again.")
    if isinstance(e, errors.RepositoryNotFoundError):
        code = e.response.status_code if getattr(e, "response", None) is not None else "?"
        return (what + f"the Hub has no repository {item.repo} that this machine may read (HTTP {code}). If it is "
                "private or gated, log in (hf auth login) or set HF_TOKEN; if it was renamed, download the model by "
                f"hand and put it at {item.flatten or item.local_dir}.")
    if isinstance(e, (errors.RemoteEntryNotFoundError, errors.RevisionNotFoundError, FileNotFoundError)) and \
            not isinstance(e, errors.LocalEntryNotFoundError):
        return (what + f"{item.repo} has no {' or '.join(item.patterns)} (HTTP 404): the repository changed. "
                f"Download the model by hand and put it at {item.flatten or item.local_dir}.")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (what + f"the disk holding {item.local_dir} is full. Free space there (or point --models-dir at a "
                "larger disk) and run again: the files already complete are kept and the rest goes on where it "
                "stopped." + by_hand)
    if isinstance(e, errors.HfHubHTTPError):
        code = e.response.status_code if getattr(e, "response", None) is not None else "?"
        return what + f"the Hub answered HTTP {code} ({str(e).splitlines()[0]})." + again + by_hand
    if _is_network(e):
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return (what + f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached from this machine "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'no answer'}). Check the "
                "internet connection (and HTTPS_PROXY if you need a proxy)." + again + by_hand)
    if isinstance(e, OSError):
        return what + f"{e}." + again + by_hand
    raise e


def _is_network(e: BaseException) -> bool:
    """huggingface_hub's 'cannot reach the Hub' (LocalEntryNotFoundError, raised from the connection error) or the
    HTTP client's connection, timeout and protocol errors, wherever in the chain."""
    from huggingface_hub import errors

    while e is not None:
        if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            return True
        e = e.__cause__ or e.__context__
    return False
