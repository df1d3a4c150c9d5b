"""GGUF text encoders as llama.cpp's converter writes them: tensor names from the `gguf` package's own name map
(`gguf.TensorNameMap`), the query and key rows of llama-family architectures reordered as llama.cpp's
`LlamaModel.permute` does, attention head counts in the metadata, 2-D weights quantized by `gguf`'s quantizer. Loaded
through the single-file text-encoder loaders, the staged graph equals the reference pipeline whose text encoder holds
the same weights as `gguf`'s reference dequantizer reads them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from letterpress.loaders import layers
from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
PROMPT = "a poster with the words hello world in bold red letters"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's rows, taken as (2, rows/2), interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llm_gguf(state: dict, path: str, arch: str, heads: int, kv_heads: int, permute: bool, qtype=Q.Q8_0):
    """`state` (transformers names under `model.`) as llama.cpp writes a GGUF; returns the weights as `gguf`
    dequantizes them back, under the transformers names (the reference's view of the file)."""
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    names = gguf.TensorNameMap(arch_id, blocks)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    back = {}
    for key, value in state.items():
        array = value.detach().float().contiguous().numpy()
        if permute and key.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, heads)
        elif permute and key.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, kv_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        if array.ndim == 2 and array.shape[1] % block == 0:
            packed = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            stored = gguf.quants.dequantize(packed, qtype)
        else:
            writer.add_tensor(name, array)
            stored = array
        if permute and key.endswith(("q_proj.weight", "k_proj.weight")):  # the reference undoes it its own way
            h = heads if "q_proj" in key else kv_heads
            stored = stored.reshape(h, stored.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(stored.shape)
        back[key] = torch.from_numpy(np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return back


def test_the_permutation_is_undone_exactly():
    """The reference's inverse (above) really inverts llama.cpp's permutation, rows and heads alike."""
    w = np.arange(8 * 12 * 3, dtype=np.float32).reshape(8 * 12, 3)
    for heads in (1, 2, 4):
        p = llama_cpp_permute(w, heads)
        assert not np.array_equal(p, w)
        back = p.reshape(heads, p.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(p.shape)
        assert np.array_equal(back, w)


# ERNIE-Image: Ministral-3 (llama-family: q/k rows permuted) -------------------------------------------------------


def ernie_node(name):
    return N["LetterpressErnieImage" + name]()


@pytest.fixture(scope="module", params=["mistral3", "llama"])
def ministral_gguf(request, ernie, models_dir):
    lm = ernie["text_encoder"].language_model
    state = {"model." + k: v for k, v in lm.state_dict().items()}
    cfg = lm.config
    name = f"ministral-3-3b-{request.param}-Q8_0.gguf"
    back = write_llm_gguf(state, os.path.join(models_dir, "text_encoders", name), request.param,
                          cfg.num_attention_heads, cfg.num_key_value_heads, permute=True)
    return name, {k[len("model."):]: v for k, v in back.items()}


def test_a_ministral_gguf_text_encoder_draws_the_pipeline_image_with_its_dequantized_weights(ernie, ministral_gguf,
                                                                                             models_dir):
    from diffusers import ErnieImagePipeline

    name, weights = ministral_gguf
    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.text_encoder.language_model.load_state_dict(weights)
    pipe.set_progress_bar_config(disable=True)
    ref = torch.from_numpy(pipe(PROMPT, height=32, width=48, num_inference_steps=2, guidance_scale=4.0,
                                generator=torch.Generator("cpu").manual_seed(5), output_type="np",
                                use_pe=False).images)
    dit, _te, vae, _pe = ernie_node("FolderLoader").run("ERNIE-Image", "auto", False)
    te = ernie_node("TextEncoderLoader").run(name, "auto")[0]
    packed = [m for m in te.module.modules() if layers.is_packed(m)]
    assert packed and all(m.weight.dtype == torch.uint8 for m in packed)  # kept as the file stores them
    pos = ernie_node("TextEncode").run(te, PROMPT)[0]
    neg = ernie_node("TextEncode").run(te, "")[0]
    lat = ernie_node("EmptyLatent").run(48, 32, 1)[0]
    out = ernie_node("Sampler").run(dit, pos, lat, 5, 2, 4.0, 4.0, 1.0, negative=neg)[0]
    image = ernie_node("VAEDecode").run(vae, out)[0]
    assert (image - ref).abs().max().item() <= 1e-4


# Ovis-Image: Qwen3 (rows as transformers has them) ----------------------------------------------------------------


def ovis_node(name):
    return N["LetterpressOvisImage" + name]()


def test_a_qwen3_gguf_text_encoder_draws_the_pipeline_image_with_its_dequantized_weights(ovis, models_dir):
    from diffusers import OvisImagePipeline

    te_model = ovis["text_encoder"]
    state = {"model." + k: v for k, v in te_model.state_dict().items()}
    cfg = te_model.config
    back = write_llm_gguf(state, os.path.join(models_dir, "text_encoders", "ovis_2.5-Q8_0.gguf"), "qwen3",
                          cfg.num_attention_heads, cfg.num_key_value_heads, permute=False)
    pipe = OvisImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "Ovis-Image-7B"))
    pipe.text_encoder.load_state_dict({k[len("model."):]: v for k, v in back.items()})
    pipe.set_progress_bar_config(disable=True)
    ref = torch.from_numpy(pipe(PROMPT, negative_prompt="", height=32, width=32, num_inference_steps=2,
                                guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(5),
                                output_type="np").images)
    dit, _te, vae = ovis_node("FolderLoader").run("Ovis-Image-7B", "auto")
    te = ovis_node("TextEncoderLoader").run("ovis_2.5-Q8_0.gguf", "auto")[0]
    pos, neg = ovis_node("TextEncode").run(te, PROMPT, "", 256)
    lat = ovis_node("EmptyLatent").run(32, 32, 1)[0]
    out = ovis_node("Sampler").run(dit, pos, lat, 5, 2, 4.0, 1.0, negative=neg)[0]
    image = ovis_node("VAEDecode").run(vae, out)[0]
    assert (image - ref).abs().max().item() <= 1e-4


def test_a_language_model_gguf_of_another_architecture_is_named(ernie, models_dir):
    lm = ernie["text_encoder"].language_model
    state = {"model." + k: v for k, v in lm.state_dict().items()}
    cfg = lm.config
    write_llm_gguf(state, os.path.join(models_dir, "text_encoders", "gemma-Q8_0.gguf"), "gemma3",
                   cfg.num_attention_heads, cfg.num_key_value_heads, permute=False)
    with pytest.raises(LetterpressError, match=r"gemma-Q8_0\.gguf.*'gemma3'.*Ministral-3"):
        ernie_node("TextEncoderLoader").run("gemma-Q8_0.gguf", "auto")


def test_a_qwen3_gguf_in_the_ernie_loader_is_named_as_the_ovis_encoder(ernie, ovis, models_dir):
    te_model = ovis["text_encoder"]
    cfg = te_model.config
    write_llm_gguf({"model." + k: v for k, v in te_model.state_dict().items()},
                   os.path.join(models_dir, "text_encoders", "qwen3-other-Q8_0.gguf"), "qwen3",
                   cfg.num_attention_heads, cfg.num_key_value_heads, permute=False)
    with pytest.raises(LetterpressError, match=r"qwen3-other-Q8_0\.gguf holds a Qwen3 language model"):
        ernie_node("TextEncoderLoader").run("qwen3-other-Q8_0.gguf", "auto")


@pytest.mark.parametrize("name,bare", [("ministral-3-3b-Q4_K_M.gguf", "ministral-3-3b"), ("Qwen3-2B.Q8_0.gguf", "Qwen3-2B"),
                                       ("ovis_2.5-UD-Q5_K_XL.gguf", "ovis_2.5"), ("te-BF16.gguf", "te")])
def test_a_gguf_finds_the_tokenizer_folder_named_without_its_quantization(tmp_path, name, bare):
    from letterpress.loaders.llm import find_tokenizer_folders

    found = find_tokenizer_folders(str(tmp_path / name), lambda _path: [])
    assert str(tmp_path / bare) in found and found[0] == str(tmp_path / name[:-5])  # the exact stem still first


def test_a_plain_file_name_is_not_cut():
    from letterpress.loaders.llm import find_tokenizer_folders

    assert find_tokenizer_folders("/m/ministral-3-3b.safetensors", lambda _p: []) == ["/m/ministral-3-3b",
                                                                                       "/m/ministral-3-3b_tokenizer"]
