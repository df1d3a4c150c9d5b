"""GLM-Image text-to-image through the node classes: parity with diffusers' GlmImagePipeline, the AR stage
against transformers' generate() (token for token, KV cache, progress, Cancel), glyph extraction, errors."""

from __future__ import annotations

import pytest
import torch

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.usefixtures("one_thread")

W, H = 96, 64
PROMPT = 'a vintage poster that says "hello world" in red'
OTHER = "a cat sitting on a wooden table, photo, soft light"


@pytest.fixture(scope="module")
def pipe(glm):
    from diffusers import GlmImagePipeline

    p = GlmImagePipeline.from_pretrained(glm["folder"])
    p.set_progress_bar_config(disable=True)
    return p


def run_nodes(m, prompt, seed, steps=3, cfg=1.5, width=W, height=H):
    prior, text = N["LetterpressGlmImageARTokens"]().run(m["ar"], prompt, width, height, seed, 0.9, 0.75)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(m["glyph"], text)
    neg, _ = N["LetterpressGlmImageGlyphEncode"]().run(m["glyph"], "")
    lat = N["LetterpressGlmImageSampler"]().run(m["dit"], prior, pos, seed, steps, cfg, negative=neg)[0]
    return prior, N["LetterpressGlmImageVAEDecode"]().run(m["vae"], lat)[0]


@pytest.fixture(scope="module")
def t2i(glm_models, pipe):
    """One reference run and one node-graph run with the same weights, seed and settings (CPU, fp32)."""
    seed = 5
    # The pipeline's own AR stage, then the pipeline with those tokens (what __call__ does in one go).
    ref_tokens, _, _ = pipe.generate_prior_tokens(PROMPT, H, W, device=torch.device("cpu"),
                                                  generator=torch.Generator().manual_seed(seed))
    ref = pipe(PROMPT, height=H, width=W, num_inference_steps=3, guidance_scale=1.5, prior_token_ids=ref_tokens,
               generator=torch.Generator().manual_seed(seed), output_type="pt").images
    prior, image = run_nodes(glm_models, PROMPT, seed)
    return dict(seed=seed, ref_tokens=ref_tokens, ref=ref.permute(0, 2, 3, 1), prior=prior, image=image)


def test_t2i_matches_reference_pipeline(t2i):
    assert torch.equal(t2i["prior"].tokens, t2i["ref_tokens"])  # prior tokens equal, token for token
    assert t2i["image"].shape == (1, H, W, 3)
    diff = (t2i["image"] - t2i["ref"]).abs().max().item()
    assert diff <= 1e-4, diff


def test_reference_call_with_its_own_ar_stage_gives_the_same_image(t2i, pipe):
    ref = pipe(PROMPT, height=H, width=W, num_inference_steps=3, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(t2i["seed"]), output_type="pt").images
    assert (t2i["image"] - ref.permute(0, 2, 3, 1)).abs().max().item() <= 1e-4


def test_cfg_one_matches_reference_without_uncond_pass(glm_models, pipe, t2i):
    prior = t2i["prior"]
    ref = pipe(PROMPT, height=H, width=W, num_inference_steps=2, guidance_scale=1.0, prior_token_ids=prior.tokens,
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], PROMPT)
    lat = N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 3, 2, 1.0)[0]
    image = N["LetterpressGlmImageVAEDecode"]().run(glm_models["vae"], lat)[0]
    assert (image - ref.permute(0, 2, 3, 1)).abs().max().item() <= 1e-4


def test_conditioning_reaches_the_image(glm_models, t2i):
    """The tiny model is re-initialised so that prompt and glyphs matter; otherwise parity proves little."""
    prior_a, img_a = t2i["prior"], t2i["image"]
    prior_b, img_b = run_nodes(glm_models, OTHER, t2i["seed"])
    assert not torch.equal(prior_a.tokens, prior_b.tokens)
    assert (img_a - img_b).abs().mean().item() > 0.02
    # Same prior, other glyph text: the glyph path alone changes the picture too.
    glyph_b, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], 'a poster that says "goodbye"')
    neg, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], "")
    lat = N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior_a, glyph_b, t2i["seed"], 3, 1.5, negative=neg)[0]
    img_c = N["LetterpressGlmImageVAEDecode"]().run(glm_models["vae"], lat)[0]
    # Far above the 1e-4 parity tolerance, so a wrong glyph encoding could not pass the parity test.
    assert (img_a - img_c).abs().mean().item() > 2e-3


def test_ar_tokens_equal_transformers_generate(glm_models, glm, host):
    """Token for token against GlmImageForConditionalGeneration.generate() with the model's own sampling
    settings, seeded the way the pipeline seeds it; one progress tick per token; the prefix runs once."""
    model, processor = glm_models["ar"].module, glm_models["ar"].tokenizer
    msgs = [[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]]
    inputs = processor.apply_chat_template(msgs, tokenize=True, target_h=H, target_w=W, return_dict=True,
                                           return_tensors="pt")
    grids = inputs["image_grid_thw"]
    max_new = int(grids[:, 1:].prod(-1).sum()) + 1
    torch.manual_seed(11)
    expected = model.generate(**inputs, max_new_tokens=max_new)[0][inputs["input_ids"].shape[-1]:]

    ticks, lengths = [], []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        prior, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, W, H, 11, 0.9, 0.75)
    finally:
        hook.remove()
    assert torch.equal(prior.generated, expected)
    assert prior.generated.numel() == max_new  # preview grid + d32 grid + end token
    assert prior.tokens.numel() == (H // 16) * (W // 16)
    assert ticks[-1] == (max_new, max_new) and len(ticks) == max_new
    assert lengths[0] == inputs["input_ids"].shape[-1] and set(lengths[1:]) == {1}  # KV cache: one token a step


def test_ar_tokens_cancel_stops_within_one_token(glm_models, host):
    lengths = []
    model = glm_models["ar"].module

    def cancel_at_5(done, total):
        if done == 5:
            host.request_interrupt()

    host.progress_listeners.append(cancel_at_5)
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with pytest.raises(Interrupted):
            N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, W, H, 1, 0.9, 0.75)
    finally:
        hook.remove()
    assert len(lengths) <= 5  # the prefill + 4 decode steps made tokens 1..5; nothing ran after token 5
    host.check_interrupt()  # the flag was consumed: the next run is not cancelled


def test_glyph_spans_and_embeddings_match_reference(glm_models, pipe):
    prompt = "a sign 'OPEN' and “late” with \"24/7\" and 「营业中」 and 'x'"
    cond, shown = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], prompt)
    assert shown.split("\n") == pipe.get_glyph_texts(prompt)[0] == ["OPEN", "x", "late", "24/7", "营业中"]
    with torch.no_grad():  # as in the pipeline's __call__
        ref = pipe._get_glyph_embeds(prompt, device=torch.device("cpu"))
        ref_empty = pipe._get_glyph_embeds("", device=torch.device("cpu"))
    assert torch.equal(cond.embeds[0][None], ref)
    empty, shown = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], "no quotes here")
    assert shown == ""
    assert torch.equal(empty.embeds[0][None], ref_empty)


def test_prior_preview_shows_the_grid(glm_models):
    prior, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, W, H, 2, 0.9, 0.75)
    image, summary = N["LetterpressGlmImagePriorPreview"]().run(prior)
    assert image.shape == (1, H, W, 3)
    cells = image[0, ::32, ::32]  # one colour per d32 token
    ids = prior.tokens.view(H // 16, W // 16)[::2, ::2]
    for (a, b) in [((0, 0), (0, 1)), ((0, 0), (1, 2)), ((1, 1), (0, 2))]:
        same_id = ids[a] == ids[b]
        assert same_id == torch.equal(cells[a], cells[b])
    assert "2x3 d32 tokens" in summary


def test_fp8_folder_load_encodes_glyphs(glm, glm_models):
    """fp8_e4m3fn on the Folder Loader stores the DiT and AR weights in fp8; the small ByT5 glyph encoder (whose
    T5 layers compute in their weights' dtype) is kept in bf16, so Glyph Encode runs."""
    ar, glyph, dit, vae = N["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "fp8_e4m3fn")
    assert {p.dtype for p in glyph.module.parameters()} == {torch.bfloat16}
    assert torch.float8_e4m3fn in {p.dtype for p in dit.module.parameters()}
    fp8, _ = N["LetterpressGlmImageGlyphEncode"]().run(glyph, 'a sign that says "open"')
    ref, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], 'a sign that says "open"')
    assert (fp8.embeds[0].float() - ref.embeds[0].float()).abs().max() < 0.1 * ref.embeds[0].abs().max()


def test_sizes_must_be_multiples_of_32(glm_models):
    with pytest.raises(LetterpressError, match="multiple of 32.*Use 64 or 96"):
        N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 80, 64, 0, 0.9, 0.75)
    with pytest.raises(LetterpressError, match="height.*multiple of 32"):
        N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 48, 0, 0.9, 0.75)


def test_a_special_token_sampled_inside_the_grid_is_named(glm_models, monkeypatch):
    """At a high temperature the AR model can sample one of its special tokens (ids past the VQ codebook) where
    an image token belongs: AR Tokens says so and names the fix, instead of DiT Sample blaming a model mismatch."""
    from letterpress.samplers import glm_image as stage

    real = stage.generate

    def with_a_special_token(model, seed, max_new, **kw):
        out = real(model, seed, max_new, **kw)
        out[0, -3] = 16400  # inside the target grid, which ends just before end-of-image
        return out

    monkeypatch.setattr(stage, "generate", with_a_special_token)
    codebook = glm_models["ar"].module.config.vq_config.num_embeddings  # the tiny model's: 256
    with pytest.raises(LetterpressError, match=rf"non-image token \(id 16400, past its {codebook}-entry codebook\) "
                                               r"inside the 2x2 token grid.*temperature 1.5.*Lower the temperature"):
        N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 1.5, 0.75)


def test_wrong_wires_give_clear_errors(glm_models):
    prior, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], PROMPT, 64, 64, 0, 0.9, 0.75)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], PROMPT)
    with pytest.raises(LetterpressError, match="negative"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 0, 1, 1.5)
    with pytest.raises(LetterpressError, match="prior"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], "not a prior", pos, 0, 1, 1.0)
    with pytest.raises(LetterpressError, match="no reference images"):
        N["LetterpressGlmImageVAEEncode"]().run(glm_models["vae"], prior=prior)
    with pytest.raises(LetterpressError, match="not Letterpress conditioning: wire it from a GLM-Image Glyph Encode node"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, "a prompt", 0, 1, 1.0)


def test_component_loaders_equal_the_folder_loader(glm_models, t2i):
    ar = N["LetterpressGlmImageARLoader"]().run("GLM-Image", "auto")[0]
    glyph = N["LetterpressGlmImageGlyphEncoderLoader"]().run("GLM-Image", "auto")[0]
    dit = N["LetterpressGlmImageDiTLoader"]().run("GLM-Image", "auto")[0]
    vae = N["LetterpressGlmImageVAELoader"]().run("GLM-Image", "auto")[0]
    for handle, folder_handle in ((ar, glm_models["ar"]), (glyph, glm_models["glyph"]), (dit, glm_models["dit"]), (vae, glm_models["vae"])):
        a, b = handle.module.state_dict(), folder_handle.module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prior, image = run_nodes(dict(ar=ar, glyph=glyph, dit=dit, vae=vae), PROMPT, t2i["seed"])
    assert torch.equal(prior.tokens, t2i["prior"].tokens) and torch.equal(image, t2i["image"])


def test_not_a_glm_folder_is_refused_clearly(glm, tmp_path):
    other = tmp_path / "SomethingElse"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "ErnieImagePipeline"}')
    named = r"SomethingElse holds an ErnieImagePipeline.*GLM-Image loader needs a GlmImagePipeline.*zai-org/GLM-Image"
    with pytest.raises(LetterpressError, match=named):
        N["LetterpressGlmImageFolderLoader"]().run(str(other), "auto")
    with pytest.raises(LetterpressError, match=named):
        N["LetterpressGlmImageDiTLoader"]().run(str(other), "auto")
    incomplete = tmp_path / "GLM-Image-partial"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text('{"_class_name": "GlmImagePipeline"}')
    with pytest.raises(LetterpressError, match="vision_language_encoder/"):
        N["LetterpressGlmImageARLoader"]().run(str(incomplete), "auto")
