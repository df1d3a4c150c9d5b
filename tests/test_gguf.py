"""GGUF DiT files (as ComfyUI-GGUF users have them): written here with the `gguf` package's own writer and
quantizer from the tiny ERNIE-Image DiT, loaded through the single-file DiT loader, weights kept packed and
dequantized per layer; the staged graph equals diffusers' pipeline run with the same dequantized weights (`gguf`'s
reference dequantizer), a LoRA on the GGUF DiT equals that LoRA on the dequantized weights, and broken, unsupported
or foreign files are named with the fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fixtures.common import write_gguf

from letterpress.loaders import layers
from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
PROMPT = "a poster with the words hello world in bold red letters"


def node(name):
    return N["LetterpressErnieImage" + name]()


@pytest.fixture(scope="module")
def q8(ernie, models_dir):
    """The tiny DiT as diffusion_models/ernie-image-Q8_0.gguf, and its weights as gguf dequantizes them."""
    path = os.path.join(models_dir, "diffusion_models", "ernie-image-Q8_0.gguf")
    return write_gguf(ernie["transformer"].state_dict(), path, Q.Q8_0)


@pytest.fixture(scope="module")
def reference(ernie, models_dir, q8):
    """diffusers' pipeline with the DiT's weights replaced by the dequantized GGUF ones."""
    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.transformer.load_state_dict(q8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graph(dit, te, vae, seed=3, width=48, height=32, steps=3, cfg=4.0):
    pos = node("TextEncode").run(te, PROMPT)[0]
    neg = node("TextEncode").run(te, "")[0]
    lat = node("EmptyLatent").run(width, height, 1)[0]
    out = node("Sampler").run(dit, pos, lat, seed, steps, cfg, 4.0, 1.0, negative=neg)[0]
    return node("VAEDecode").run(vae, out)[0]


@pytest.fixture(scope="module")
def te_vae(ernie):
    _dit, te, vae, _pe = node("FolderLoader").run("ERNIE-Image", "auto", False)
    return te, vae


def test_gguf_files_are_listed_with_the_single_files(q8):
    from letterpress.loaders.files import list_files

    assert "ernie-image-Q8_0.gguf" in list_files("diffusion_models")


def test_q8_0_dit_stays_packed_and_draws_the_pipeline_image_with_its_dequantized_weights(reference, te_vae, q8):
    dit = node("DiTLoader").run("ernie-image-Q8_0.gguf", "auto")[0]
    packed = [m for m in dit.module.modules() if layers.is_packed(m)]
    quantized = [k for k, v in q8.items() if k.endswith(".weight") and v.dim() == 2 and v.shape[1] % 32 == 0]
    assert len(packed) == len(quantized) > 0 and all(m.weight.dtype == torch.uint8 for m in packed)
    stored = sum(p.numel() * p.element_size() for p in dit.module.parameters())
    assert stored < 0.45 * sum(v.numel() * 4 for v in q8.values())  # ~1 byte per quantized weight, not 4
    ref = torch.from_numpy(reference(PROMPT, height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                                     generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                                     use_pe=False).images)
    assert (graph(dit, *te_vae) - ref).abs().max().item() <= 1e-4


def test_lora_on_a_gguf_dit_equals_the_lora_on_its_dequantized_weights(te_vae, q8, models_dir):
    """Applied at forward time to the dequantized weight (never merged into the packed bytes): the same image as the
    same LoRA on a safetensors file of the dequantized weights, and strength 0 gives the GGUF DiT's own image."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in q8.items()},
              os.path.join(models_dir, "diffusion_models", "ernie-image-q8-dequantized.safetensors"))
    gen = torch.Generator().manual_seed(11)
    lora = {}
    for t in ("to_q", "to_v", "to_out.0"):
        name = f"layers.0.self_attention.{t}"
        w = q8[name + ".weight"]
        lora[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(4, w.shape[1], generator=gen)
        lora[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], 4, generator=gen)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    save_file(lora, os.path.join(models_dir, "loras", "gguf_test_lora.safetensors"))

    gguf_dit = node("DiTLoader").run("ernie-image-Q8_0.gguf", "auto")[0]
    dense_dit = node("DiTLoader").run("ernie-image-q8-dequantized.safetensors", "auto")[0]
    lora_node = N["LetterpressErnieImageLoraLoader"]()
    on_gguf = graph(lora_node.run(gguf_dit, "gguf_test_lora.safetensors", 1.5)[0], *te_vae)
    on_dense = graph(lora_node.run(dense_dit, "gguf_test_lora.safetensors", 1.5)[0], *te_vae)
    plain = graph(gguf_dit, *te_vae)
    assert (on_gguf - on_dense).abs().max().item() <= 1e-4
    assert (on_gguf - plain).abs().max().item() > 1e-2  # the LoRA is there
    assert torch.equal(graph(lora_node.run(gguf_dit, "gguf_test_lora.safetensors", 0.0)[0], *te_vae), plain)
    packed = gguf_dit.module.get_submodule("layers.0.self_attention.to_q")
    assert layers.is_packed(packed) and packed.weight.dtype == torch.uint8  # still the file's bytes


def test_a_truncated_or_damaged_gguf_is_named_with_the_fix(q8, models_dir):
    src = os.path.join(models_dir, "diffusion_models", "ernie-image-Q8_0.gguf")
    data = open(src, "rb").read()
    cut = os.path.join(models_dir, "diffusion_models", "ernie-image-cut.gguf")
    open(cut, "wb").write(data[: len(data) * 2 // 3])
    with pytest.raises(LetterpressError, match=r"ernie-image-cut.gguf .*(truncated|not a readable GGUF).*download it again"):
        node("DiTLoader").run("ernie-image-cut.gguf", "auto")
    junk = os.path.join(models_dir, "diffusion_models", "ernie-image-junk.gguf")
    open(junk, "wb").write(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(LetterpressError, match=r"ernie-image-junk.gguf is not a readable GGUF file.*download it again"):
        node("DiTLoader").run("ernie-image-junk.gguf", "auto")


def test_an_unsupported_quant_type_is_named_before_anything_loads(ernie, models_dir):
    state = {k: v for k, v in ernie["transformer"].state_dict().items()}
    path = os.path.join(models_dir, "diffusion_models", "ernie-image-IQ2_XXS.gguf")
    writer = gguf.GGUFWriter(path, "ernie_image")
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    for key, value in state.items():
        if key == "layers.0.mlp.gate_proj.weight":
            rows, cols = value.shape
            cols = max(cols, block)  # one whole block per row
            writer.add_tensor(key, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.IQ2_XXS)
        else:
            writer.add_tensor(key, value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LetterpressError, match=r"ernie-image-IQ2_XXS.gguf: tensor layers.0.mlp.gate_proj.weight is "
                                               r"quantized as IQ2_XXS.*Q8_0.*Use a file of one of those types"):
        node("DiTLoader").run("ernie-image-IQ2_XXS.gguf", "auto")


def test_a_gguf_of_another_model_is_named(ovis, models_dir):
    """An Ovis-Image DiT in a GGUF file, picked in ERNIE-Image's DiT loader."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(models_dir, "diffusion_models", "ovis_image.safetensors"))
    write_gguf(state, os.path.join(models_dir, "diffusion_models", "ovis-image-Q8_0.gguf"), Q.Q8_0, prefix="")
    with pytest.raises(LetterpressError, match=r"ovis-image-Q8_0.gguf.*Ovis-Image"):
        node("DiTLoader").run("ovis-image-Q8_0.gguf", "auto")


def test_an_ovis_dit_gguf_in_original_names_is_converted_without_unpacking(ovis, models_dir):
    """Ovis-Image in ComfyUI's FLUX-style names (fused qkv, linear1 = qkv + MLP, swapped final modulation) as a GGUF
    file: the conversion moves packed rows (a row is whole blocks), so every layer, split or stacked, holds the same
    weights as the dequantized file loaded the same way, and stays packed."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(models_dir, "diffusion_models", "ovis_image.safetensors"))
    back = write_gguf(state, os.path.join(models_dir, "diffusion_models", "ovis-original-Q8_0.gguf"), Q.Q8_0, prefix="")
    save_file({k: v.contiguous() for k, v in back.items()},
              os.path.join(models_dir, "diffusion_models", "ovis-original-dequantized.safetensors"))
    loader = N["LetterpressOvisImageDiTLoader"]()
    packed = loader.run("ovis-original-Q8_0.gguf", "fp32")[0].module
    dense = loader.run("ovis-original-dequantized.safetensors", "fp32")[0].module
    checked = []
    for name, m in packed.named_modules():
        if layers.is_packed(m):
            got = layers.dequantized_weight(m)
            assert torch.equal(got, dense.get_submodule(name).weight), name
            checked.append(name)
    assert any(".attn.to_q" in n for n in checked) and any("single_transformer_blocks" in n for n in checked)
    for (name, p), (_, q) in zip(packed.named_parameters(), dense.named_parameters()):
        if p.dtype != torch.uint8:
            assert torch.equal(p, q), name
