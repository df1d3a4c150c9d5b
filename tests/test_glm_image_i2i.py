"""GLM-Image image-to-image (editing, multi-subject) through the node classes, against diffusers'
GlmImagePipeline with the minimal correction of its transformers incompatibility applied in the test.

The bug (diffusers 0.42.1 + transformers >= 5.18): `get_image_features(...).pooler_output` is now a list with
one (C, h, w) tensor per image, which `generate_prior_tokens` concatenates with `torch.cat(..., dim=0)` before
`get_image_tokens`, which itself iterates over per-image tensors. The correction removes that one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.usefixtures("one_thread")

BUGGY_LINE = "prior_token_image_embed = torch.cat(prior_token_image_embed, dim=0)"
PROMPT = 'put the dog on the beach, with a sign that says "open"'


def corrected_generate_prior_tokens():
    from diffusers.pipelines.glm_image import pipeline_glm_image as mod

    src = textwrap.dedent(inspect.getsource(mod.GlmImagePipeline.generate_prior_tokens))
    assert src.count(BUGGY_LINE) == 1, "diffusers changed: revisit the correction"
    namespace: dict = {}
    exec(compile(src.replace(BUGGY_LINE, "pass  # per-image features go to get_image_tokens as they are"),
                 mod.__file__, "exec"), mod.__dict__, namespace)
    return namespace["generate_prior_tokens"]


@pytest.fixture(scope="module")
def pipe(glm):
    from diffusers import GlmImagePipeline

    p = GlmImagePipeline.from_pretrained(glm["folder"])
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def fixed_pipe(pipe):
    from diffusers import GlmImagePipeline

    original = GlmImagePipeline.generate_prior_tokens
    GlmImagePipeline.generate_prior_tokens = corrected_generate_prior_tokens()
    yield pipe
    GlmImagePipeline.generate_prior_tokens = original


def picture(seed: int, h: int, w: int) -> Image.Image:
    """A smooth random picture (blobs, not noise), as PNG-exact uint8."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return Image.fromarray((big[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def as_image(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0)[None]


def run_nodes(m, prompt, refs, width, height, seed, steps=3, cfg=1.5):
    kw = {f"reference_{i + 1}": as_image(r) for i, r in enumerate(refs)}
    prior, text = N["LetterpressGlmImageARTokens"]().run(m["ar"], prompt, width, height, seed, 0.9, 0.75, **kw)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(m["glyph"], text)
    neg, _ = N["LetterpressGlmImageGlyphEncode"]().run(m["glyph"], "")
    ref_lat = N["LetterpressGlmImageVAEEncode"]().run(m["vae"], prior=prior)[0] if refs else None
    lat = N["LetterpressGlmImageSampler"]().run(m["dit"], prior, pos, seed, steps, cfg, negative=neg,
                                                 reference_latents=ref_lat)[0]
    return prior, N["LetterpressGlmImageVAEDecode"]().run(m["vae"], lat)[0]


def reference(pipe, prompt, refs, width, height, seed, steps=3, cfg=1.5):
    tokens, ref_ids, grids = pipe.generate_prior_tokens(prompt, height, width, image=[list(refs)],
                                                        device=torch.device("cpu"),
                                                        generator=torch.Generator().manual_seed(seed))
    image = pipe(prompt, image=list(refs), height=height, width=width, num_inference_steps=steps,
                 guidance_scale=cfg, prior_token_ids=tokens, prior_token_image_ids=ref_ids,
                 source_image_grid_thw=grids, generator=torch.Generator().manual_seed(seed),
                 output_type="pt").images
    return tokens, ref_ids[0], image.permute(0, 2, 3, 1)


def test_reference_pipeline_crashes_without_the_correction(pipe):
    # The concatenated features reach the VQ model's 1x1 conv with the wrong channel count.
    with pytest.raises(RuntimeError, match="channels"):
        pipe.generate_prior_tokens(PROMPT, 64, 64, image=[[picture(1, 64, 64)]], device=torch.device("cpu"),
                                   generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", ["edit", "edit_resized", "multi_subject"])
def test_image_to_image_matches_corrected_reference(glm_models, fixed_pipe, case):
    if case == "edit":
        refs, (w, h) = [picture(1, 64, 64)], (64, 64)
    elif case == "edit_resized":  # a picture the processor and the VAE resize (each once, from the original)
        refs, (w, h) = [picture(5, 70, 100)], (64, 64)
    else:  # two references of different sizes, as in multi-subject composition
        refs, (w, h) = [picture(1, 64, 64), picture(2, 64, 96)], (96, 64)
    seed = 7
    tokens, ref_ids, ref_image = reference(fixed_pipe, PROMPT, refs, w, h, seed)
    prior, image = run_nodes(glm_models, PROMPT, refs, w, h, seed)
    assert torch.equal(prior.tokens, tokens)
    assert torch.equal(torch.cat(prior.reference_tokens), ref_ids)
    assert len(prior.reference_tokens) == len(refs)
    diff = (image - ref_image).abs().max().item()
    assert diff <= 1e-4, diff


def test_reference_images_change_the_result(glm_models):
    """The KV cache written from the reference latents reaches the output: another reference with the same
    prompt and seed gives a clearly different image, and so does dropping the references."""
    _, a = run_nodes(glm_models, PROMPT, [picture(1, 64, 64)], 64, 64, 3)
    _, b = run_nodes(glm_models, PROMPT, [picture(9, 64, 64)], 64, 64, 3)
    _, c = run_nodes(glm_models, PROMPT, [], 64, 64, 3)
    assert (a - b).abs().mean().item() > 2e-3
    assert (a - c).abs().mean().item() > 2e-3


def test_reference_images_are_resized_the_way_the_processor_expects(glm_models):
    from transformers.models.glm_image.image_processing_pil_glm_image import smart_resize

    odd = picture(4, 70, 100)
    prior, image = run_nodes(glm_models, PROMPT, [odd], 64, 64, 1, steps=1, cfg=1.0)
    ip = glm_models["ar"].tokenizer.image_processor
    gh, gw = smart_resize(70, 100, ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"])
    assert prior.reference_images[0].shape[1:3] == (2 * gh, 2 * gw)
    assert prior.reference_grids == [(2 * gh // 16, 2 * gw // 16)]  # AR grid upsampled = VAE latent / DiT patch
    assert image.shape == (1, 64, 64, 3)


def test_editing_wiring_errors(glm_models):
    ref = as_image(picture(1, 64, 64))
    prior, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 0.9, 0.75, reference_1=ref)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], PROMPT)
    with pytest.raises(LetterpressError, match="1 reference image.*VAE Encode"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 0, 1, 1.0)
    two = N["LetterpressGlmImageVAEEncode"]().run(glm_models["vae"], image=torch.cat([ref, ref]))[0]
    with pytest.raises(LetterpressError, match="1 reference image.*hold 2"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 0, 1, 1.0, reference_latents=two)
    with pytest.raises(LetterpressError, match="multiples of 16"):
        N["LetterpressGlmImageVAEEncode"]().run(glm_models["vae"], image=as_image(picture(1, 70, 100)))
    core = {"samples": torch.zeros(1, 4, 8, 8)}  # ComfyUI's own VAE Encode / Empty Latent Image
    with pytest.raises(LetterpressError, match=r"shape \(1, 4, 8, 8\); this DiT reads \(1, 16, H, W\)"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 0, 1, 1.0, reference_latents=core)
    with pytest.raises(LetterpressError, match="reference_1: an IMAGE is"):
        N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 0.9, 0.75, reference_1=ref[..., :2])
    grey, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 0.9, 0.75,
                                                     reference_1=ref[..., :1])
    assert len(grey.reference_images) == 1 and grey.reference_images[0].shape[-1] == 3
    five = torch.cat([ref] * 3)
    with pytest.raises(LetterpressError, match="at most 4 reference images in all, got 5"):
        N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 0.9, 0.75, reference_1=five,
                                               reference_2=torch.cat([ref, ref]))


def test_torch_compile_follows_the_reference_kv_cache(glm_models):
    """Image-to-image through the Torch Compile node: the compiled DiT reads the references' KV cache in the
    conditional pass and skips it in the unconditional one, as the eager DiT does."""
    compiled = dict(glm_models, dit=N["LetterpressGlmImageCompile"]().run(glm_models["dit"], "default")[0])
    refs = [picture(1, 64, 64)]
    _, eager = run_nodes(glm_models, PROMPT, refs, 64, 64, 5)
    _, ours = run_nodes(compiled, PROMPT, refs, 64, 64, 5)
    _, other = run_nodes(compiled, PROMPT, [picture(9, 64, 64)], 64, 64, 5)
    assert (ours - eager).abs().max().item() <= 1e-4
    from letterpress.loaders.compiled import ran_compiled

    assert ran_compiled(glm_models["dit"].module)
    assert (other - ours).abs().mean().item() > 2e-3  # another reference still changes the compiled result


def test_working_memory_counts_the_reference_kv_cache(glm_models, monkeypatch):
    """With reference images, DiT Sample asks the host for room for the key/value cache they fill, as big as
    the cache the DiT really writes (counted here from what it stores)."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageLayerKVCache

    from letterpress.samplers import glm_image as stage

    stored = []
    original = GlmImageLayerKVCache.store
    monkeypatch.setattr(GlmImageLayerKVCache, "store",
                        lambda self, k, v: stored.append(k.nbytes + v.nbytes) or original(self, k, v))
    prior, _ = run_nodes(glm_models, PROMPT, [picture(1, 64, 64), picture(2, 48, 80)], 64, 64, 3, steps=1)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], PROMPT)
    plain = dataclasses.replace(prior, reference_tokens=[], reference_grids=[], reference_images=[])
    extra = stage.memory_required(glm_models["dit"], prior, pos) - stage.memory_required(glm_models["dit"], plain, pos)
    assert sum(stored) > 0 and extra == sum(stored)
