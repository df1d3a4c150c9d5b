"""GGUF text encoders: language models in llama.cpp's tensor names, read as the transformers names the loaders use.

A text encoder GGUF (a Ministral-3 or Qwen3 converted by llama.cpp's `convert_hf_to_gguf.py`, as ComfyUI-GGUF users
download them for `text_encoders/`) names its tensors `token_embd`, `blk.N.attn_q`, ... and, for the llama-family
architectures (`llama`, `mistral3`), stores the query and key projections with their rows reordered for llama.cpp's
interleaved rotary embedding (`LlamaModel.permute` in the converter). `LlamaCppNames` shows such a file under the
transformers names (`model.layers.N.self_attn.q_proj.weight`, ...) with those rows put back in transformers' order,
so detection, config inference from shapes and the LLM loader work on it as on a single .safetensors file. Rows are
whole quantization blocks, so quantized weights are reordered without unpacking. The tokenizer is not read from the
file: as for safetensors text encoders, the tokenizer folder is found beside the file or in the diffusers folder.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import DerivedView
from .errors import LetterpressError
from .packed import Packed

# llama.cpp architecture -> whether the converter reordered q/k rows (LlamaModel and its subclasses do; Qwen's
# converters keep transformers' half-split rotary layout).
ARCHITECTURES = {"llama": True, "mistral3": True, "qwen3": False, "qwen2": False}


def _users() -> str:
    """'Ministral-3 language model for <family>, ...': the language-model text encoders the families use."""
    from .detect import COMPONENTS, component_users

    parts = {}
    for cid, _role, name, _, _ in COMPONENTS:
        users = component_users(cid, "") if name.endswith("language model") else []
        if users:
            parts.setdefault(cid, f"{name} for {' / '.join(users)}")
    return ", ".join(parts.values())


# llama.cpp tensor name (per block: after `blk.N.`) -> transformers name (per layer: after `model.layers.N.`).
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_llama_cpp_llm(ck) -> bool:
    """A GGUF whose tensors carry llama.cpp's language-model names."""
    return "token_embd.weight" in ck or any(k.startswith("blk.") for k in ck)


def transformers_name(name: str) -> str | None:
    """The transformers name of a llama.cpp tensor name, or None for tensors no text encoder uses (rope factors)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    return None


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: row i of transformers' layout is row index[i] of the file's.

    The converter splits each head's rows into two halves (the rotary pairs' first and second members) and
    interleaves them; this takes each head's rows as (pairs, 2) and reads the first members, then the second."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


class LlamaCppNames(DerivedView):
    """A GGUF language model (`gguf_file.GgufCheckpoint`) under transformers' tensor names (module docstring)."""

    def __init__(self, ck):
        super().__init__(ck)
        arch = ck.metadata.get("gguf.architecture", "")
        self.metadata = dict(ck.metadata)
        name = os.path.basename(ck.source)
        if arch not in ARCHITECTURES:
            raise LetterpressError(
                f"{name} is a GGUF language model of llama.cpp architecture '{arch or 'unknown'}'; Letterpress reads "
                f"text encoder GGUFs of the architectures {', '.join(sorted(ARCHITECTURES))} ({_users()}). Pick the "
                "text encoder of the model you run.")
        self._names = {}
        for key in ck:
            hf = transformers_name(key)
            if hf is not None:
                self._names[hf] = key
        self._heads = {}
        if ARCHITECTURES[arch]:
            q_heads = ck.int_field(f"{arch}.attention.head_count")
            kv_heads = ck.int_field(f"{arch}.attention.head_count_kv") or q_heads
            if not q_heads:
                raise LetterpressError(
                    f"{name} does not record its attention head count ({arch}.attention.head_count), which is "
                    "needed to read its query and key weights. The file is incomplete: download it again.")
            for hf in self._names:
                if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                    self._heads[hf] = q_heads
                elif hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                    self._heads[hf] = kv_heads

    def base_key(self, key: str) -> str:
        return self._names[key]

    def shape(self, key: str) -> tuple:
        return self.base.shape(self._names[key])

    def __getitem__(self, key: str):
        tensor = self.base[self._names[key]]
        heads = self._heads.get(key)
        if heads is None:
            return tensor
        shape = tensor.shape
        index = unpermute_rows(shape[0], heads)
        if isinstance(tensor, Packed):  # GGUF rows are whole blocks: reorder the packed rows
            return tensor.rows(index)
        return tensor[index]

    def names(self):
        return self._names.keys()
