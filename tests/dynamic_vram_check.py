"""The pack under ComfyUI's dynamic VRAM manager, proven on CPU inside a release that has it (0.33.0 and later).

Run by test_dynamic_vram.py as `python dynamic_vram_check.py COMFYUI_TREE MODE ...`; prints one JSON object.

On CPU ComfyUI never turns the manager on (main.py: NVIDIA only) and comfy-aimdo's native library does not load, so
what it would do on a GPU is reproduced from its code as read in 0.33.0:

- `draw MODELS_DIR INPUT_DIR WORKFLOW.json ...`: each workflow headless (the Runner on the ComfyUI host) twice,
  first as 0.33.0 runs on CPU, then as main.py sets things up when comfy-aimdo works
  (`comfy.memory_management.aimdo_enabled`, so ComfyUI's Linear and Embedding are created without weights and
  filled lazily) and with every ComfyUI layer computing through its cast path (`comfy_cast_weights`, which
  ModelPatcherDynamic sets on every layer that has it). Reports the largest difference between the two runs'
  images, how many layers were filled lazily, every module that ran while holding parameters of its own and did not
  take them through ComfyUI's cast path (a model's own norm classes do: the manager loads such modules whole, as it
  loads its own layers of 16 KB or less; layer_check.py holds their size at real scale), and every parameter whose
  archived dtype (`<name>_comfy_model_dtype`, from
  which the manager sizes and casts a layer's virtual-memory slot) is not the dtype it is stored in.
- `lora`: for every layer kind, packed ones included, a layer built as the ComfyUI host builds it, a LoRA added as
  the pack adds it, the layer loaded by the real `ModelPatcherDynamic.load` (which places each patch) and run
  through the real vbar cast path (`cast_modules_with_vbar` / `resolve_cast_module_with_vbar`), with comfy-aimdo's
  native calls stood in for: a slot that is never resident (the path where the patch is applied at each call) and
  a CPU device named `cpu:0` (so it differs from the weights' `cpu`, as a GPU does). Reports each kind's output
  against an independent reference (the plain torch layer with weight + LoRA) and against the layer without it.

- `device MODELS_DIR`: the stages that generate, loaded by the pack's loaders and then by the dynamic manager:
  where the stage and the transformers model say they compute.

`--break NAME` breaks what a check checks, to show that it fails then (see BREAKS).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_GPU = torch.device("cpu", 0)  # what the dynamic manager's load device is here (see module docstring)
BREAKS = {
    "cast": "packed layers compute as the standalone host's do (around ComfyUI's cast path)",
    "archive": "no dtypes archived after loading (slots sized from the dtype layers were built in)",
    "patches": "packed layers apply none of the weight patches ComfyUI placed on them",
}


def _start(tree: str) -> None:
    sys.path.insert(0, os.path.realpath(tree))  # the ComfyUI tree: its comfy package and folder_paths
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`
    comfy.cli_args.args.disable_pinned_memory = True  # pinned host buffers are comfy-aimdo's, which has no CPU build
    import comfy.model_management  # noqa: F401


def _break(name: str | None) -> None:
    from letterpress.loaders import comfy_compat, comfy_host, layers

    if name == "cast":
        comfy_compat.CastPathPacked.forward = layers.QuantizedWeight.forward
    elif name == "archive":
        comfy_compat.archive_dtypes = lambda module: None
    elif name == "patches":
        original = comfy_compat.CastPathPacked.forward_comfy_cast_weights

        def forward(self, input, *args, **kwargs):
            with comfy_compat._hidden(self, weight_function=[], weight_lowvram_function=None):
                return original(self, input, *args, **kwargs)
        comfy_compat.CastPathPacked.forward_comfy_cast_weights = forward
    assert comfy_host  # the host module reads comfy_compat's names at call time


# draw ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dynamic_setup():
    """As main.py sets ComfyUI up when comfy-aimdo works, and every ComfyUI layer computing through its cast path
    (ModelPatcherDynamic sets comfy_cast_weights on each; a CPU load device keeps the plain ModelPatcher here)."""
    import comfy.memory_management
    import comfy.model_patcher
    import comfy.ops

    saved = (comfy.memory_management.aimdo_enabled, comfy.model_patcher.CoreModelPatcher,
             comfy.ops.CastWeightBiasOp.comfy_cast_weights)
    comfy.memory_management.aimdo_enabled = True
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.ops.CastWeightBiasOp.comfy_cast_weights = True
    try:
        yield
    finally:
        (comfy.memory_management.aimdo_enabled, comfy.model_patcher.CoreModelPatcher,
         comfy.ops.CastWeightBiasOp.comfy_cast_weights) = saved


class _Watch:
    """Which modules holding parameters of their own ran, which took weights through ComfyUI's cast path, and how
    many layers ComfyUI filled lazily, while installed."""

    def __init__(self):
        import comfy.ops

        self.ops = comfy.ops
        self.cast: set[int] = set()
        self.ran: dict[int, torch.nn.Module] = {}
        self.lazy = 0
        self.hooks = []

    def __enter__(self):
        ops, watch = self.ops, self

        self._cast, self._lazy = ops.cast_bias_weight, ops.disable_weight_init._lazy_load_from_state_dict

        def cast_bias_weight(s, *args, **kwargs):
            watch.cast.add(id(s))
            return watch._cast(s, *args, **kwargs)

        def lazy(*args, **kwargs):
            watch.lazy += 1
            return watch._lazy(*args, **kwargs)

        ops.cast_bias_weight = cast_bias_weight
        ops.disable_weight_init._lazy_load_from_state_dict = staticmethod(lazy)

        def on_module(module, *_):
            if next(module.parameters(recurse=False), None) is not None:
                watch.ran[id(module)] = module
        self.hooks.append(torch.nn.modules.module.register_module_forward_hook(on_module))
        return self

    def __exit__(self, *exc):
        self.ops.cast_bias_weight = self._cast
        self.ops.disable_weight_init._lazy_load_from_state_dict = staticmethod(self._lazy)
        for h in self.hooks:
            h.remove()

    def uncast(self) -> list[dict]:
        """Per class of module that ran with weights of its own and did not take them through the cast path: its
        layer kind (None for a model's own class, e.g. transformers' RMSNorm classes) and whether it is packed."""
        from letterpress.loaders import layers

        out = {}
        for key, m in self.ran.items():
            if key not in self.cast:
                out[type(m).__name__] = {"class": type(m).__name__, "kind": layers.kind_of(m),
                                         "packed": layers.is_packed(m)}
        return sorted(out.values(), key=lambda u: u["class"])


def _dtype_mismatches() -> list[str]:
    """Parameters of the loaded stages whose archived dtype is not their stored one."""
    from letterpress.loaders import comfy_compat

    out = []
    for patcher in comfy_compat.loaded_patchers():
        for name, m in patcher.model.named_modules():
            for p_name, p in m.named_parameters(recurse=False):
                archived = getattr(m, f"{p_name}_comfy_model_dtype", None)
                if archived is not None and archived != p.dtype:
                    out.append(f"{type(patcher.model.inner).__name__}.{name}.{p_name}: archived {archived}, "
                               f"stored {p.dtype}")
    return out[:5]


def draw(models_dir: str, input_dir: str, workflows: list[str]) -> dict:
    import comfy.model_management as mm
    import folder_paths

    from letterpress.loaders.host import get_host
    from letterpress.runner import Runner

    for kind in os.listdir(models_dir):
        folder_paths.add_model_folder_path(kind, os.path.join(models_dir, kind), is_default=True)
    get_host().input_dir = input_dir
    report = {}
    for path in workflows:
        wf = json.load(open(path))
        saved = [(nid, node["inputs"]["images"]) for nid, node in wf.items() if node["class_type"] == "SaveImage"]
        images = []
        for dynamic in (False, True):
            mm.unload_all_models()
            with (_dynamic_setup() if dynamic else contextlib.nullcontext()), _Watch() as watch:
                results = Runner().run(wf)["results"]
                mismatches = _dtype_mismatches()
            images.append([results[src][i].float() for _, (src, i) in saved])
        report[os.path.basename(path)] = {
            "images": len(images[0]),
            "diff": max(float((a - b).abs().max()) for a, b in zip(*images)),
            "lazy": watch.lazy,
            "uncast": watch.uncast(),
            "dtype_mismatches": mismatches,
        }
    return report


# lora ----------------------------------------------------------------------------------------------------------


def _stand_in_for_aimdo() -> None:
    """comfy-aimdo's native calls as a slot that is never resident (the path that applies patches at each call)."""
    import comfy.model_management as mm
    import comfy.ops
    import comfy_aimdo.host_buffer
    import comfy_aimdo.model_vbar as vbar

    class ModelVBAR:
        def __init__(self, size, device_index):
            self.offset = 0

        def alloc(self, size):
            slot, self.offset = (self, self.offset, size), self.offset + size
            return slot

        def prioritize(self):
            pass

        def loaded_size(self):
            return 0

        def free_memory(self, size):
            return 0

    class HostBuffer:
        def __init__(self, *args, **kwargs):
            self.size = 0

    vbar.ModelVBAR, comfy_aimdo.host_buffer.HostBuffer = ModelVBAR, HostBuffer
    vbar.vbar_fault = lambda slot: None  # no mapped memory: cast into a buffer, patches applied on the way
    vbar.vbar_signature_compare = lambda a, b: False
    vbar.vbar_unpin = lambda slot: None
    is_cpu = mm.is_device_cpu
    mm.is_device_cpu = lambda device: False if device == FAKE_GPU else is_cpu(device)
    cast = comfy.ops.cast_bias_weight

    def cast_bias_weight(s, input=None, dtype=None, device=None, *args, **kwargs):
        return cast(s, input, dtype, FAKE_GPU if hasattr(s, "_v") else device, *args, **kwargs)

    comfy.ops.cast_bias_weight = cast_bias_weight


def _gguf(weight: torch.Tensor, qtype):
    import gguf

    from letterpress.loaders import gguf_quants

    raw = gguf.quants.quantize(weight.numpy(), qtype)
    return gguf_quants.packed(torch.from_numpy(raw.copy()).reshape(-1), int(qtype), tuple(weight.shape))


def _fp8_scaled(weight: torch.Tensor):
    from letterpress.loaders.comfy_quant import ComfyCodec
    from letterpress.loaders.packed import Packed

    scale = weight.abs().max() / 448.0
    return Packed((weight / scale).to(torch.float8_e4m3fn), ComfyCodec({"format": "float8_e4m3fn"}),
                  tuple(weight.shape), {"weight_scale": scale.reshape(())})


def _cases():
    """(label, plain torch layer, its input, how the weight is stored, whether the pack's LoRA path applies).

    Every layer holds more than 16 KB, so the dynamic manager gives it a slot (smaller ones it loads whole, merging
    patches as ModelPatcher does)."""
    import gguf

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g)
    img = torch.randn(1, 16, 8, 8, generator=g)
    seq = torch.randn(2, 5, 4096, generator=g)
    Q = gguf.GGMLQuantizationType
    yield "Linear", torch.nn.Linear(256, 128), x, None, True
    yield "Linear fp8 storage", torch.nn.Linear(256, 128), x, "fp8", True
    yield "Linear packed GGUF Q8_0", torch.nn.Linear(256, 128), x, lambda w: _gguf(w, Q.Q8_0), True
    yield "Linear packed GGUF Q4_0", torch.nn.Linear(256, 128), x, lambda w: _gguf(w, Q.Q4_0), True
    yield "Linear packed ComfyUI float8_e4m3fn", torch.nn.Linear(256, 128), x, _fp8_scaled, True
    yield "Conv2d", torch.nn.Conv2d(16, 64, 3, padding=1), img, None, False
    yield "GroupNorm", torch.nn.GroupNorm(32, 4096), torch.randn(1, 4096, 2, 2, generator=g), None, False
    yield "LayerNorm", torch.nn.LayerNorm(4096), seq, None, False
    yield "RMSNorm", torch.nn.RMSNorm(8192, eps=1e-6), torch.randn(2, 5, 8192, generator=g), None, False
    yield "Embedding", torch.nn.Embedding(512, 64), torch.tensor([[1, 7, 300, 511]]), None, False


def lora() -> dict:
    import comfy.model_patcher as mp

    from letterpress.loaders import comfy_compat, layers
    from letterpress.loaders.comfy_host import ComfyHost
    from letterpress.loaders.handle import ModelHandle
    from letterpress.loaders.lora import LoraWeights

    _stand_in_for_aimdo()
    mp.CoreModelPatcher = mp.ModelPatcherDynamic  # as main.py does when comfy-aimdo works
    host = ComfyHost()
    host.compute_device = lambda: FAKE_GPU
    report = {}
    for label, plain, x, storage, pack_lora in _cases():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in plain.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
        ops = host.layer_ops(layers.FP8 if storage == "fp8" else torch.float32)
        if callable(storage):
            ops = layers.with_quantized(ops)
        built = layers.build_layers(torch.nn.Sequential(_meta_copy(plain)), ops)
        tensors = {f"0.{k}": v.detach().clone() for k, v in plain.state_dict().items()}
        if storage == "fp8":
            tensors["0.weight"] = tensors["0.weight"].to(layers.FP8)
        elif callable(storage):
            tensors["0.weight"] = storage(tensors["0.weight"])
        assert not layers.load_into(built[0], tensors, "0.")
        weight = layers.dequantized_weight(built[0], torch.float32)  # what the stored weight stands for
        rank, alpha, strength = 4, 2.0, 0.8
        rows = weight.shape[0]
        a = torch.randn(rank, weight[0].numel(), generator=g) * 0.3
        b = torch.randn(rows, rank, generator=g) * 0.3
        handle = host.wrap(ModelHandle("test", "layer", built))
        if pack_lora:  # the pack's own path: LoRA Loader -> host.add_patches
            handle = host.add_patches(handle, LoraWeights("test", "peft", {"0": (a, b, alpha / rank)}), strength)
        else:  # a ComfyUI patch on a layer the pack's LoRAs never target, to show ComfyUI's placement reaches it
            handle.patcher.add_patches({"inner.0.weight": comfy_compat.lora_patch(a, b, alpha)}, strength)
        handle.patcher.load(FAKE_GPU)
        layer = handle.module[0]
        delta = (b @ a).reshape(weight.shape) * (alpha / rank) * strength
        with torch.no_grad():
            compute = torch.bfloat16 if storage == "fp8" else torch.float32
            inp = x if not x.is_floating_point() else x.to(compute)
            got = layer(inp).float()
            want = _with_weight(plain, weight + delta, compute)(inp).float()
            base = _with_weight(plain, weight, compute)(inp).float()
        report[label] = {
            "patcher": type(handle.patcher).__name__,
            "slot": hasattr(layer, "_v"),
            "placed": sorted(k for k in ("weight_lowvram_function", "weight_function")
                             if getattr(layer, k, None)),
            "diff": float((got - want).abs().max()),
            "lora_effect": float((want - base).abs().max()),
            "scale": float(want.abs().max()),
        }
    return report


def device(models_dir: str) -> dict:
    """Where each stage that generates computes once the dynamic manager loaded it, loaded by the pack's own loaders
    (ERNIE-Image's prompt enhancer, GLM-Image's AR model, ERNIE-4.5-VL): its large layers' weights stay on the
    offload device, so the stage (handle.device) and the transformers model (model.device, where generate() moves
    its inputs at every step) must name the load device, not their first weight's."""
    import comfy.model_patcher as mp

    from letterpress.loaders import ernie_image, ernie_vl, glm_image
    from letterpress.loaders.host import get_host
    from letterpress.loaders.storage import resolve

    _stand_in_for_aimdo()
    mp.CoreModelPatcher = mp.ModelPatcherDynamic
    host = get_host()  # the ComfyUI host, as the loaders reach it
    host.compute_device = lambda: FAKE_GPU
    auto = resolve("auto", host.compute_device())  # as a loader node resolves its weight_dtype
    stages = {
        "prompt enhancer": lambda: ernie_image.load_prompt_enhancer(os.path.join(models_dir, "diffusers",
                                                                                 "ERNIE-Image"), auto),
        "GLM-Image AR model": lambda: glm_image.load_ar(os.path.join(models_dir, "diffusers", "GLM-Image"), auto),
        "ERNIE-4.5-VL": lambda: ernie_vl.load(os.path.join(models_dir, "LLM", "ERNIE-4.5-VL-28B-A3B-PT"), auto),
    }
    report = {}
    for name, load in stages.items():
        handle = host.wrap(load())
        handle.patcher.load(FAKE_GPU)
        model = handle.module
        report[name] = {"patcher": type(handle.patcher).__name__, "first_weight": str(next(model.parameters()).device),
                        "slots": sum(hasattr(m, "_v") for m in model.modules()), "handle": str(handle.device),
                        "model": str(model.device), "class": type(model).__name__}
    return report


def _meta_copy(layer: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(layer).to("meta")


def _with_weight(plain: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    """The plain torch layer computing with `weight` (an independent reference: no ComfyUI or pack code)."""
    import copy

    ref = copy.deepcopy(plain).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(weight.to(dtype))
    return ref


if __name__ == "__main__":
    args = sys.argv[1:]
    broken = None
    if "--break" in args:
        i = args.index("--break")
        broken = args[i + 1]
        del args[i:i + 2]
    _start(args[0])
    torch.set_num_threads(1)
    _break(broken)
    mode = args[1]
    out = draw(args[2], args[3], args[4:]) if mode == "draw" else lora() if mode == "lora" else device(args[2])
    print(json.dumps(out))
