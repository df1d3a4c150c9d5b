"""Decoder-only language models used as text encoders or prompt writers (Ministral-3, Qwen3, ...).

Both layouts are loaded through the same path: a transformers folder (config.json + safetensors,
possibly wrapped in a multimodal model whose keys start with `language_model.`) or a single file
without config, whose architecture is read off the tensor shapes over a template config.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import torch

from .errors import LetterpressError
from .files import list_diffusers_folders
from .host import get_host
from .stage import Layout, Stage, transformers_model
from .weights import Checkpoint, read_json, strip_prefix


def infer_llm_shapes(ck: Checkpoint, prefix: str) -> dict:
    """Config fields that the tensor shapes determine (head_dim by the rule documented below)."""
    layers = {int(k[len(prefix) :].split(".")[1]) for k in ck if k.startswith(prefix + "layers.")}
    vocab, hidden = ck.shape(prefix + "embed_tokens.weight")
    q_out = ck.shape(prefix + "layers.0.self_attn.q_proj.weight")[0]
    k_out = ck.shape(prefix + "layers.0.self_attn.k_proj.weight")[0]
    norm = prefix + "layers.0.self_attn.q_norm.weight"
    if norm in ck:
        head_dim = ck.shape(norm)[0]
    else:
        # Real checkpoints of these families use 128-wide heads; toy ones the widest that divides both.
        head_dim = 128 if q_out % 128 == 0 and k_out % 128 == 0 else next(
            d for d in (64, 32, 16, 8, 4) if q_out % d == 0 and k_out % d == 0
        )
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ck.shape(prefix + "layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=len(layers),
        num_attention_heads=q_out // head_dim,
        num_key_value_heads=k_out // head_dim,
        head_dim=head_dim,
    )


def llm_prefix(ck: Checkpoint) -> str:
    """The prefix before `embed_tokens.weight` (e.g. 'language_model.model.', 'model.', '')."""
    return strip_prefix(ck.keys(), "embed_tokens.weight")


def llm_config(
    ck: Checkpoint, folder: str | None, config_cls, template: dict, sub_config: str | None = None
) -> object:
    """The text config: from config.json when the checkpoint is a folder, else shapes over the template."""
    if folder and os.path.exists(os.path.join(folder, "config.json")):
        cfg = read_json(os.path.join(folder, "config.json"), "text model")
        if sub_config and sub_config in cfg:
            cfg = cfg[sub_config]
        cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
        return config_cls(**cfg)
    fields = dict(template)
    fields.update(infer_llm_shapes(ck, llm_prefix(ck)))
    return config_cls(**fields)


def llm_stage(what: str, signature: tuple[str, str], loader: str, config_cls, model_cls, template: dict,
              sub_config: str | None = None, with_head: bool = False) -> Stage:
    """The stage of a language model `model_cls` (stage.load_stage): its config from the folder's config.json or off
    the shapes over `template` (`llm_config`), keys of any wrapper prefix mapped on.

    with_head: the module is a *ForCausalLM (keys model.* and lm_head.*, the head tied to the embeddings when the
    config says so); else the bare model.
    """

    def read(ck: Checkpoint, path: str) -> Layout:
        config = llm_config(ck, path if os.path.isdir(path) else None, config_cls, template, sub_config)
        prefix = llm_prefix(ck)
        head_prefix = prefix[: -len("model.")] if prefix.endswith("model.") else prefix

        def key_map(k: str) -> str | None:
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                return ("model." + rest) if with_head else rest
            if with_head and k == head_prefix + "lm_head.weight":
                return "lm_head.weight"
            return None  # vision tower, projector, tokenizer blobs, an unused lm_head

        if with_head and not _tied(config) and head_prefix + "lm_head.weight" not in ck:
            raise LetterpressError(f"{what}: the file has no lm_head; it is a text encoder, not a text generator.")
        return Layout(config, key_map=key_map)

    def tie(module: torch.nn.Module) -> None:
        if _tied(module.config):
            module.lm_head.weight = module.model.embed_tokens.weight

    return Stage(what, signature, loader, read, transformers_model(model_cls),
                 optional=("lm_head.",) if with_head else (), finish=tie if with_head else None)


def _tied(config) -> bool:
    return getattr(config, "tie_word_embeddings", False)


def read_generation_config(module: torch.nn.Module, folders: list[str], what: str) -> None:
    """Give `module` the generation_config.json of the first of `folders` that has one, as `from_pretrained` does,
    so generate() samples with the release's defaults (top_k, repetition penalty, ...) for whatever a node does
    not set itself."""
    from transformers import GenerationConfig

    folder = next((f for f in folders if os.path.isfile(os.path.join(f, "generation_config.json"))), None)
    if folder is None:
        return
    read_json(os.path.join(folder, "generation_config.json"), what)  # a clear error for a damaged file
    module.generation_config = GenerationConfig.from_pretrained(folder)


def load_tokenizer(folders: list[str], what: str, hint: str) -> object:
    """The first tokenizer found in `folders`; a clear error saying where to put one otherwise."""
    from transformers import AutoTokenizer

    folder = next((f for f in folders if holds_tokenizer(f)), None)
    if folder is None:
        raise LetterpressError(f"{what}: no tokenizer found (looked in: {', '.join(f for f in folders if f)}). {hint}")
    return read_tokenizer(AutoTokenizer.from_pretrained, folder, what)


def holds_tokenizer(folder: str) -> bool:
    """Whether `folder` holds a tokenizer load_tokenizer takes (its tokenizer.json or tokenizer_config.json); what
    `run --download` asks too before fetching one."""
    return bool(folder) and os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files a tokenizer's vocabulary can come in; a folder with none of them cannot make a tokenizer.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def read_tokenizer(load: Callable[[str], object], folder: str, what: str, files: tuple[str, ...] = TOKENIZER_FILES,
                   kind: str = "tokenizer") -> object:
    """`load(folder)` (a tokenizer's or processor's from_pretrained, which reads `files`); a damaged or incomplete
    folder becomes a clear error naming the file to download again, not transformers' or tokenizers' traceback."""
    try:
        return load(folder)
    except Exception as e:  # JSONDecodeError, KeyError, tokenizers' plain Exception, "Couldn't instantiate ..."
        reason, fix = _tokenizer_problem(folder, e, files)
        raise LetterpressError(f"{what}: the {kind} in {folder} cannot be read ({reason}): {fix}.") from e


def _tokenizer_problem(folder: str, error: Exception, files: tuple[str, ...]) -> tuple[str, str]:
    """(what went wrong, what to do): a file of `files` that is not JSON, the files missing, else the error's first
    line (a missing package, a tokenizer class this transformers lacks, ...)."""
    present = [name for name in files if os.path.exists(os.path.join(folder, name))]
    for name in present:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{name} is cut short or not JSON: {e}", f"download {name} again"
    if not present:
        return f"{' and '.join(files)} missing", "download the folder again"
    if "tokenizer.json" in files and not any(os.path.exists(os.path.join(folder, v)) for v in VOCAB_FILES):
        return "no vocabulary: tokenizer.json is missing", "download tokenizer.json again"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"{type(error).__name__}: {first[:200]}",
            f"check that the folder is complete ({', '.join(files)}) and that transformers and tokenizers are up to date")


# The quantization a GGUF's name ends with ('-Q4_K_M', '.Q8_0', '_IQ4_XS', '-UD-Q5_K_XL', '-BF16'), which its
# tokenizer folder's name does not carry.
_QUANT_SUFFIX = re.compile(r"[-_.](?:ud-)?(?:i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)


def find_tokenizer_folders(path: str, sibling_names: Callable[[str], list[str]]) -> list[str]:
    """Candidate tokenizer folders for a single file, in the order its loader tries them: '<stem>/' or
    '<stem>_tokenizer/' beside it (for a GGUF also the stem without its quantization: 'ministral-3-3b/' for
    'ministral-3-3b-Q4_K_M.gguf'), then `sibling_names(path)` (e.g. in_diffusers_folders)."""
    stems = [os.path.splitext(path)[0]]
    bare = _QUANT_SUFFIX.sub("", stems[0])
    if bare != stems[0] and os.path.basename(bare):
        stems.append(bare)
    return [s + tail for s in stems for tail in ("", "_tokenizer")] + sibling_names(path)


def in_diffusers_folders(pipelines: tuple[str, ...], sub: str) -> Callable[[str], list[str]]:
    """find_tokenizer_folders' `sibling_names` for a model published in the diffusers layout: `sub`/ of every
    diffusers folder of its `pipelines`."""
    return lambda _path: [os.path.join(base, f, sub) for base in get_host().model_folders("diffusers")
                          for f in list_diffusers_folders(pipelines)]
