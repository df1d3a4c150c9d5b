"""Every stage's module, at its real size on the meta device, built as the host builds it: which layers are not
the host's class for their kind, or lack an attribute that class's own constructor sets.

Run by test_layers.py in this process (standalone host) and, as `python layer_check.py COMFYUI_TREE`, inside each
ComfyUI release (its comfy.ops classes). Prints one JSON object: stage -> problems (empty lists when all is well).
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def stages() -> dict:
    """Every model stage the pack loads, at its real size: (stage name, factory) per family."""
    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import real_size_accounting as real  # the real architectures, shared with the memory accounting
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration, Ministral3ForCausalLM

    out = {f"{model}: {stage}": factory for model, (_, parts) in real.models(1024).items()
           for stage, factory, _ in parts}
    out["ERNIE-Image: prompt enhancer (Ministral-3 3B)"] = lambda: Ministral3ForCausalLM(real.ministral3_3b().config)
    out["ERNIE-4.5-VL (28B-A3B)"] = lambda: Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig())
    return out


def problems(module: torch.nn.Module, ops) -> list[str]:
    from letterpress.loaders import layers

    found = []
    fresh_attrs: dict[type, set] = {}
    for name, m in module.named_modules():
        kind = layers.kind_of(m)
        if kind is None or kind not in ops.classes:
            continue
        want = ops.classes[kind]
        if type(m) is not want:
            found.append(f"{name}: {type(m).__module__}.{type(m).__qualname__}, not {want.__qualname__}")
            continue
        if want not in fresh_attrs:  # what this class's constructor gives a layer of this kind
            fresh = want(**layers._constructor_args(m, kind), device="meta")
            fresh_attrs[want] = set(vars(fresh))
        lacking = fresh_attrs[want] - set(vars(m))
        if lacking:
            found.append(f"{name}: lacks {sorted(lacking)} that {want.__qualname__}() sets")
    return found


def plain_weights(module: torch.nn.Module) -> dict[str, int]:
    """Per class of module holding weights of its own that is not one of ComfyUI's cast layers (a model's own
    classes, e.g. transformers' RMSNorm): the most bytes one holds, in bf16. ComfyUI's dynamic VRAM manager loads
    such modules whole onto the GPU, as it loads its own layers of 16 KB or less."""
    out: dict[str, int] = {}
    for m in module.modules():
        own = list(m.parameters(recurse=False))
        if own and not hasattr(m, "comfy_cast_weights"):
            out[type(m).__name__] = max(out.get(type(m).__name__, 0), sum(p.numel() * 2 for p in own))
    return out


def small_linears(module: torch.nn.Module, limit: int = 16 * 1024) -> list[str]:
    """Linear layers whose weight packed at 4.5 bits (Q4_0) takes `limit` bytes or less: the dynamic manager would
    load them whole, and a LoRA on a packed one would not reach its weight wrappers."""
    from letterpress.loaders import layers

    return [name for name, m in module.named_modules()
            if layers.kind_of(m) == "Linear" and m.in_features * m.out_features * 18 // 32 <= limit]


def check(dtype: torch.dtype) -> dict:
    from letterpress.loaders import layers
    from letterpress.loaders.host import get_host
    from letterpress.loaders.weights import build_empty

    ops = get_host().layer_ops(dtype)
    report = {"ops": ops.name, "kinds": sorted(ops.classes), "stages": {}}
    for stage, factory in stages().items():
        module = layers.build_layers(build_empty(factory), ops)
        report["stages"][stage] = problems(module, ops)
        if "Linear" in ops.classes and hasattr(ops.classes["Linear"], "comfy_cast_weights"):  # inside ComfyUI
            report.setdefault("plain_weights", {})[stage] = plain_weights(module)
            report.setdefault("small_linears", {})[stage] = small_linears(module)
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.path.realpath(sys.argv[1]))  # the ComfyUI tree: its comfy package and folder_paths
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`
    import comfy.model_management  # noqa: F401

    print(json.dumps({d: check(getattr(torch, d)) for d in sys.argv[2:]}))
