"""Every stage quantized at load (weight_dtype Q8_0 / Q4_0, loaders/quantize.py), headless: each family's staged graph
equals its reference pipeline run with the same weights dequantized (gguf's own quantizer and reader, applied to the
reference's Linear weights as the loader chooses them), within the tolerances of the unquantized parity tests; the
weights stay packed in the layers GGUF files use, and a LoRA on them works as on a GGUF file's."""

from __future__ import annotations

import os

import pytest
import torch

from fixtures.common import dequantized_like_the_loader
from letterpress.loaders import layers, quantize
from letterpress.loaders.gguf_quants import GgufCodec
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a poster with the words hello world in bold red letters"


def packed_layers(module: torch.nn.Module, qtype: int) -> list[torch.nn.Module]:
    """The layers of a loaded stage that keep packed weights; each is of type `qtype`, stored as bytes."""
    found = [m for m in module.modules() if layers.is_packed(m)]
    assert found and all(m.pack_codec == GgufCodec(qtype) and m.weight.dtype == torch.uint8 for m in found)
    return found


def expected_packed(module: torch.nn.Module, qtype: int) -> int:
    """How many Linear layers of a reference model the loader packs."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(1 for m in module.modules() if type(m) is torch.nn.Linear and id(m.weight) not in embedded
               and quantize.packs(tuple(m.weight.shape), qtype))


# ERNIE-Image: DiT, text encoder, prompt enhancer -----------------------------------------------------------------


def ernie_node(name):
    return N["LetterpressErnieImage" + name]()


@pytest.mark.parametrize("choice", ["Q8_0", "Q4_0"])
def test_ernie_image_every_stage_quantized_equals_the_pipeline_with_those_weights(ernie, models_dir, choice):
    from diffusers import ErnieImagePipeline

    qtype = quantize.TYPES[choice]
    dit, te, vae, pe = ernie_node("FolderLoader").run("ERNIE-Image", choice, True)
    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.set_progress_bar_config(disable=True)
    for stage, ref in ((dit, pipe.transformer), (te, pipe.text_encoder.language_model), (pe, pipe.pe)):
        assert len(packed_layers(stage.module, qtype)) == expected_packed(ref, qtype) > 0
        dequantized_like_the_loader(ref, qtype)

    pos = ernie_node("TextEncode").run(te, PROMPT)[0]
    neg = ernie_node("TextEncode").run(te, "")[0]
    lat = ernie_node("EmptyLatent").run(48, 32, 1)[0]
    out = ernie_node("Sampler").run(dit, pos, lat, 3, 3, 4.0, 4.0, 1.0, negative=neg)[0]
    image = ernie_node("VAEDecode").run(vae, out)[0]
    ref = pipe(PROMPT, height=32, width=48, num_inference_steps=3, guidance_scale=4.0, output_type="np",
               generator=torch.Generator("cpu").manual_seed(3), use_pe=False).images
    assert (image - torch.from_numpy(ref)).abs().max().item() <= 1e-4

    max_new = pipe.pe_tokenizer.model_max_length
    ref_text = pipe._enhance_prompt_with_pe("a cat", torch.device("cpu"), width=64, height=48, temperature=1.0,
                                            top_p=1.0)
    ours = ernie_node("PromptEnhance").run(pe, "a cat", 64, 48, 0, 0.0, 1.0, max_new)[0]
    assert ours == ref_text


# Ovis-Image: DiT, text encoder -----------------------------------------------------------------------------------


def test_ovis_image_every_stage_quantized_equals_the_pipeline_with_those_weights(ovis, models_dir):
    from diffusers import OvisImagePipeline

    qtype = quantize.TYPES["Q8_0"]
    dit, te, vae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "Q8_0")
    pipe = OvisImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "Ovis-Image-7B"))
    pipe.set_progress_bar_config(disable=True)
    for stage, ref in ((dit, pipe.transformer), (te, pipe.text_encoder)):
        assert len(packed_layers(stage.module, qtype)) == expected_packed(ref, qtype) > 0
        dequantized_like_the_loader(ref, qtype)
    pos, neg = N["LetterpressOvisImageTextEncode"]().run(te, PROMPT, "", 256)
    lat = N["LetterpressOvisImageEmptyLatent"]().run(48, 32, 1)[0]
    out = N["LetterpressOvisImageSampler"]().run(dit, pos, lat, 3, 3, 4.0, 1.0, negative=neg)[0]
    image = N["LetterpressOvisImageVAEDecode"]().run(vae, out)[0]
    ref = pipe(PROMPT, negative_prompt="", height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np", max_sequence_length=256).images
    assert (image - torch.from_numpy(ref)).abs().max().item() <= 1e-4


# GLM-Image: AR model (its vision encoder too) and DiT; the glyph encoder (ByT5, 0.2B) stays in the compute dtype --


def test_glm_image_every_stage_quantized_equals_the_pipeline_with_those_weights(glm):
    from diffusers import GlmImagePipeline

    qtype = quantize.TYPES["Q4_0"]
    ar, glyph, dit, vae = N["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "Q4_0")
    pipe = GlmImagePipeline.from_pretrained(glm["folder"])
    pipe.set_progress_bar_config(disable=True)
    for stage, ref in ((ar, pipe.vision_language_encoder), (dit, pipe.transformer)):
        assert len(packed_layers(stage.module, qtype)) == expected_packed(ref, qtype) > 0
        dequantized_like_the_loader(ref, qtype)
    vision = ar.module.model.visual
    assert any(layers.is_packed(m) for m in vision.modules())  # the vision part is quantized too
    assert not any(layers.is_packed(m) for m in glyph.module.modules())

    seed, w, h, prompt = 5, 96, 64, 'a vintage poster that says "hello world" in red'
    ref_tokens, _, _ = pipe.generate_prior_tokens(prompt, h, w, device=torch.device("cpu"),
                                                  generator=torch.Generator().manual_seed(seed))
    ref = pipe(prompt, height=h, width=w, num_inference_steps=3, guidance_scale=1.5, prior_token_ids=ref_tokens,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images.permute(0, 2, 3, 1)
    prior, text = N["LetterpressGlmImageARTokens"]().run(ar, prompt, w, h, seed, 0.9, 0.75)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glyph, text)
    neg, _ = N["LetterpressGlmImageGlyphEncode"]().run(glyph, "")
    lat = N["LetterpressGlmImageSampler"]().run(dit, prior, pos, seed, 3, 1.5, negative=neg)[0]
    image = N["LetterpressGlmImageVAEDecode"]().run(vae, lat)[0]
    assert torch.equal(prior.tokens, ref_tokens)
    assert (image - ref).abs().max().item() <= 1e-4


# ERNIE-4.5-VL (loaded by transformers, then its Linear layers and expert banks packed) ---------------------------


def test_ernie_vl_quantized_answers_as_transformers_with_those_weights(ernie_vl):
    from transformers import AutoTokenizer, Ernie4_5_VLMoeForConditionalGeneration, Ernie4_5_VLMoeImageProcessorPil

    from test_ernie_vl import as_tensor, pil_images, reference_ids, words

    qtype = quantize.TYPES["Q8_0"]
    vl = N["LetterpressErnieVLLoader"]().run("ERNIE-4.5-VL-28B-A3B-PT", "Q8_0")[0]
    folder = ernie_vl["folder"]
    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    assert len(packed_layers(vl.module, qtype)) == expected_packed(model, qtype) > 0
    assert any(layers.is_packed(m) for m in vl.module.model.vision_tower.modules())
    dequantized_like_the_loader(model, qtype)
    reference = model, AutoTokenizer.from_pretrained(folder), Ernie4_5_VLMoeImageProcessorPil.from_pretrained(folder)
    tok = reference[1]
    for seed in range(1, 9):  # an image whose reference answer is long and holds no framing token
        images = pil_images(seed, 1)
        ref = reference_ids(reference, images, thinking=False, tokens=16)
        body = ref[:-1] if ref and ref[-1] == tok.eos_token_id else ref
        if len(body) >= 8 and tok.bos_token_id not in body and tok.pad_token_id not in body:
            break
    answer, _ = N["LetterpressErnieVLGenerate"]().run(vl, as_tensor(images), "free question", "describe this image", "",
                                                      False, 16, 0.0, 0.8, 0)
    assert len(body) >= 8 and answer == words(tok, body), seed


# The same layers as a GGUF file's: LoRAs (and QLoRA training, tests/test_lora_training.py) work on them unchanged --


def test_a_dit_quantized_at_load_is_the_gguf_files_dit_byte_for_byte_and_takes_loras_alike(shipped_models):
    """ernie-image.safetensors loaded as Q4_0 against the GGUF the `gguf` package writes from the same weights in Q4_0
    (conftest's ernie-image-turbo-Q4_K_M.gguf): the same layer classes holding the same bytes, so the same image with
    and without a LoRA."""
    loader, lora_node = ernie_node("DiTLoader"), N["LetterpressErnieImageLoraLoader"]()
    ours = loader.run("ernie-image.safetensors", "Q4_0")[0]
    theirs = loader.run("ernie-image-turbo-Q4_K_M.gguf", "auto")[0]
    a, b = dict(ours.module.named_modules()), dict(theirs.module.named_modules())
    packed = [n for n, m in a.items() if layers.is_packed(m)]
    assert packed == [n for n, m in b.items() if layers.is_packed(m)] and packed
    for n in packed:
        assert type(a[n]) is type(b[n]) and a[n].pack_codec == b[n].pack_codec and a[n].qshape == b[n].qshape
        assert torch.equal(a[n].weight, b[n].weight), n
    te, vae = ernie_node("TextEncoderLoader").run("ministral-3-3b.safetensors", "auto")[0], \
        ernie_node("VAELoader").run("flux2-vae.safetensors", "auto")[0]

    def image(dit):
        pos = ernie_node("TextEncode").run(te, PROMPT)[0]
        lat = ernie_node("EmptyLatent").run(32, 32, 1)[0]
        return ernie_node("VAEDecode").run(vae, ernie_node("Sampler").run(dit, pos, lat, 1, 2, 1.0, 4.0, 1.0)[0])[0]

    plain = image(ours)
    assert torch.equal(plain, image(theirs))
    with_lora = image(lora_node.run(ours, "ernie_image_lora.safetensors", 1.0)[0])
    assert torch.equal(with_lora, image(lora_node.run(theirs, "ernie_image_lora.safetensors", 1.0)[0]))
    assert (with_lora - plain).abs().max().item() > 1e-3  # the LoRA is there
