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
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a poster with the words hello world in bold red letters"


def packed_layers(module: torch.nn.Module, qtype: int) -> list[torch.nn.Module]:
    """The layers of a loaded stage that keep packed weights; each is of type `qtype`, stored as bytes."""
    found = [m for m in module.modules() if layers.is_packed(m)]
    assert found and all(m.pack_fmt == qtype and m.weight.dtype == torch.uint8 for m in found)
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
