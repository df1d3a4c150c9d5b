"""ComfyUI's own quantized DiT files (scaled fp8 with `scale_weight`, mixed precision with per-layer `comfy_quant`
configs and `weight_scale`), written here by their documented layout from the tiny ERNIE-Image DiT: loaded by the
single-file DiT loader with the fp8 weights kept packed and dequantized per layer, they draw what diffusers' pipeline
draws with the same dequantized weights (fp8 x scale, computed here independently), and a LoRA applies on top.
How the formats dequantize against ComfyUI's own code is in test_comfy_quant.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from letterpress.loaders import layers
from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a poster with the words hello world in bold red letters"
PREFIX = "model.diffusion_model."


def node(name):
    return N["LetterpressErnieImage" + name]()


def quantize(w: torch.Tensor, fmt=torch.float8_e4m3fn):
    """Per-tensor fp8 as ComfyUI stores it: weight / scale in fp8, scale = amax / fp8 max (float32)."""
    scale = w.abs().max().float() / torch.finfo(fmt).max
    return (w.float() / scale).to(fmt), scale


def write(state: dict, path: str, kind: str) -> dict:
    """`state` as a ComfyUI quantized file of `kind` ("scaled_fp8" or "mixed"): every 2-D weight quantized. Returns
    the weights as they dequantize (fp8 value x scale, in float32)."""
    out, back, layers_meta = {}, {}, {}
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 2:
            layer = key[: -len(".weight")]
            fmt = torch.float8_e5m2 if kind == "mixed" and "mlp" in key else torch.float8_e4m3fn
            q, scale = quantize(value, fmt)
            out[PREFIX + key] = q
            back[key] = q.float() * scale
            if kind == "scaled_fp8":
                out[PREFIX + layer + ".scale_weight"] = scale
            else:
                out[PREFIX + layer + ".weight_scale"] = scale
                conf = {"format": "float8_e5m2" if fmt == torch.float8_e5m2 else "float8_e4m3fn"}
                out[PREFIX + layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
                layers_meta[layer] = conf
        else:
            out[PREFIX + key] = value.contiguous()
            back[key] = value.float()
    if kind == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, path)
    return back


@pytest.fixture(scope="module", params=["scaled_fp8", "mixed"])
def quantized(request, ernie, models_dir):
    name = f"ernie-image-{request.param}.safetensors"
    back = write(ernie["transformer"].state_dict(), os.path.join(models_dir, "diffusion_models", name), request.param)
    return name, back


@pytest.fixture(scope="module")
def te_vae(ernie):
    _dit, te, vae, _pe = node("FolderLoader").run("ERNIE-Image", "auto", False)
    return te, vae


def graph(dit, te, vae, seed=3):
    pos = node("TextEncode").run(te, PROMPT)[0]
    neg = node("TextEncode").run(te, "")[0]
    lat = node("EmptyLatent").run(48, 32, 1)[0]
    out = node("Sampler").run(dit, pos, lat, seed, 3, 4.0, 4.0, 1.0, negative=neg)[0]
    return node("VAEDecode").run(vae, out)[0]


def test_a_comfyui_quantized_dit_stays_fp8_and_draws_the_pipeline_image(quantized, te_vae, models_dir):
    from diffusers import ErnieImagePipeline

    name, back = quantized
    dit = node("DiTLoader").run(name, "auto")[0]
    packed = [m for m in dit.module.modules() if layers.is_packed(m)]
    assert packed and all(m.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for m in packed)
    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.transformer.load_state_dict(back)
    pipe.set_progress_bar_config(disable=True)
    ref = torch.from_numpy(pipe(PROMPT, height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                                generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                                use_pe=False).images)
    assert (graph(dit, *te_vae) - ref).abs().max().item() <= 1e-4


def test_a_lora_on_a_comfyui_quantized_dit_applies_at_forward_time(quantized, te_vae, models_dir):
    name, back = quantized
    gen = torch.Generator().manual_seed(5)
    w = back["layers.0.self_attention.to_q.weight"]
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    save_file({"transformer.layers.0.self_attention.to_q.lora_A.weight": 0.3 * torch.randn(4, w.shape[1], generator=gen),
               "transformer.layers.0.self_attention.to_q.lora_B.weight": 0.3 * torch.randn(w.shape[0], 4, generator=gen)},
              os.path.join(models_dir, "loras", "quant_test_lora.safetensors"))
    save_file({PREFIX + k: v.contiguous() for k, v in back.items()},
              os.path.join(models_dir, "diffusion_models", "ernie-image-dequantized.safetensors"))
    lora = N["LetterpressErnieImageLoraLoader"]()
    on_packed = graph(lora.run(node("DiTLoader").run(name, "auto")[0], "quant_test_lora.safetensors", 1.5)[0], *te_vae)
    on_dense = graph(lora.run(node("DiTLoader").run("ernie-image-dequantized.safetensors", "auto")[0],
                              "quant_test_lora.safetensors", 1.5)[0], *te_vae)
    assert (on_packed - on_dense).abs().max().item() <= 1e-4


def test_a_format_that_cannot_be_read_is_named_with_the_layer(ernie, models_dir):
    state = {PREFIX + k: v.contiguous() for k, v in ernie["transformer"].state_dict().items()}
    conf = json.dumps({"format": "awq_w4a16"}).encode()
    state[PREFIX + "layers.0.mlp.gate_proj.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    save_file(state, os.path.join(models_dir, "diffusion_models", "ernie-image-awq.safetensors"))
    with pytest.raises(LetterpressError, match=r"awq_w4a16"):
        node("DiTLoader").run("ernie-image-awq.safetensors", "auto")
