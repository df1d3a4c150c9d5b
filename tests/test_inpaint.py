"""Inpainting through ComfyUI's Set Latent Noise Mask (a LATENT with "noise_mask": 1 redraws, 0 keeps): the
ERNIE-Image and Ovis-Image samplers redraw the masked area only. No reference pipeline inpaints with these
models, so the tests check what the blend must give: a full mask is the plain run, an empty mask gives the input
latent back bit for bit, and a half mask keeps exactly the unmasked half while redrawing the other."""

from __future__ import annotations

import pytest
import torch

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 128  # ERNIE-Image latents 8 cells wide, Ovis-Image 16


def picture() -> torch.Tensor:
    return torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ernie_run(ernie, session_host):
    dit, te, vae, _ = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    pos = N["LetterpressErnieImageTextEncode"]().run(te, "a red sign")[0]
    neg = N["LetterpressErnieImageTextEncode"]().run(te, "")[0]
    latent = N["LetterpressErnieImageVAEEncode"]().run(vae, picture())[0]

    def run(lat, denoise=1.0):
        return N["LetterpressErnieImageSampler"]().run(dit, pos, lat, 3, 3, 4.0, 3.0, denoise, negative=neg)[0]["samples"]
    return latent, run


@pytest.fixture(scope="module")
def ovis_run(ovis, session_host):
    dit, te, vae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")
    pos, neg = N["LetterpressOvisImageTextEncode"]().run(te, "a red sign", "", 256)
    latent = N["LetterpressOvisImageVAEEncode"]().run(vae, picture())[0]

    def run(lat, denoise=1.0):
        return N["LetterpressOvisImageSampler"]().run(dit, pos, lat, 3, 3, 5.0, denoise, negative=neg)[0]["samples"]
    return latent, run


def left_half_mask() -> torch.Tensor:
    """A MASK as Set Latent Noise Mask passes it: (1, H, W), the left half to redraw."""
    mask = torch.zeros(1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1.0
    return mask


@pytest.mark.parametrize("family", ["ernie", "ovis"])
@pytest.mark.parametrize("denoise", [1.0, 0.7])
def test_noise_mask_redraws_only_the_masked_area(family, denoise, request):
    latent, run = request.getfixturevalue(f"{family}_run")
    init = latent["samples"]
    plain = run(latent, denoise)
    assert torch.equal(run({**latent, "noise_mask": torch.ones(1, SIZE, SIZE)}, denoise), plain)
    assert torch.equal(run({**latent, "noise_mask": torch.zeros(1, SIZE, SIZE)}, denoise), init)

    half = run({**latent, "noise_mask": left_half_mask()}, denoise)
    w = init.shape[-1]
    kept, redrawn = slice(w // 2 + 1, w), slice(0, w // 2 - 1)  # away from the bilinear edge column
    assert torch.equal(half[..., kept], init[..., kept])
    assert (half[..., redrawn] - init[..., redrawn]).abs().max() > 0.05
    # Blended at every step, not pasted at the end: the redrawn half saw the kept half while it was drawn.
    assert not torch.equal(half[..., redrawn], plain[..., redrawn])

    pair = {**latent, "samples": torch.cat([init, init.flip(-1)]), "noise_mask": left_half_mask()}
    both = run(pair, denoise)  # one mask for a batch of two
    assert torch.equal(both[..., kept], pair["samples"][..., kept])


def test_a_mask_that_is_not_a_mask_is_named(ernie_run):
    latent, run = ernie_run
    with pytest.raises(LetterpressError, match="noise_mask is not a MASK"):
        run({**latent, "noise_mask": torch.zeros(0)})


def test_glm_image_refuses_a_noise_mask_on_its_reference_latents(glm_models):
    ref = picture()
    prior, _ = N["LetterpressGlmImageARTokens"]().run(glm_models["ar"], "a sign", SIZE, SIZE, 0, 0.9, 0.75, reference_1=ref)
    pos, _ = N["LetterpressGlmImageGlyphEncode"]().run(glm_models["glyph"], "a sign")
    refs = N["LetterpressGlmImageVAEEncode"]().run(glm_models["vae"], prior=prior)[0]
    with pytest.raises(LetterpressError, match="noise mask .*GLM-Image does not use here"):
        N["LetterpressGlmImageSampler"]().run(glm_models["dit"], prior, pos, 0, 1, 1.0,
                                              reference_latents={**refs, "noise_mask": torch.ones(1, SIZE, SIZE)})


def test_shipped_inpaint_workflow_keeps_the_opaque_part(ernie, host, tmp_path):
    """workflows/api/ernie_image_inpaint_api.json headless: LoadImage's mask (the transparent part) is redrawn,
    the opaque part of the picture's latent is kept exactly."""
    import os

    from PIL import Image

    from letterpress.runner import Runner, load_workflow, set_values

    size = 128
    rgba = (torch.rand(size, size, 4, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    rgba[..., 3] = 255
    rgba[:, : size // 2, 3] = 0  # transparent left half: redraw it
    host.input_dir = str(tmp_path)
    Image.fromarray(rgba.numpy(), "RGBA").save(tmp_path / "ernie_image_inpaint.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wf = set_values(load_workflow(os.path.join(root, "workflows", "api", "ernie_image_inpaint_api.json")), ["steps=2"])
    results = Runner().run(wf)["results"]
    encoded, sampled = results["5"][0]["samples"], results["7"][0]["samples"]
    w = encoded.shape[-1]
    assert torch.equal(sampled[..., w // 2 + 1:], encoded[..., w // 2 + 1:])
    assert (sampled[..., : w // 2 - 1] - encoded[..., : w // 2 - 1]).abs().max() > 0.05


def test_kept_area_is_exact_with_a_bf16_dit(ernie, ernie_run):
    latent, _ = ernie_run
    dit, te, _, _ = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "bf16", False)
    pos = N["LetterpressErnieImageTextEncode"]().run(te, "a red sign")[0]
    out = N["LetterpressErnieImageSampler"]().run(dit, pos, {**latent, "noise_mask": torch.zeros(1, SIZE, SIZE)},
                                                 3, 2, 1.0, 3.0, 1.0)[0]["samples"]
    assert torch.equal(out, latent["samples"].float())


def test_ernie_image_masks_at_the_vae_resolution_not_the_patch_size(ernie_run):
    """ERNIE-Image latents hold 2x2 VAE cells (16 px) per position; the mask is applied per 8-px cell: a mask edge
    at 72 px redraws the left sub-cells of latent column 4 and keeps its right ones exactly."""
    latent, run = ernie_run
    mask = torch.zeros(1, SIZE, SIZE)
    mask[..., :72] = 1.0
    out, init = run({**latent, "noise_mask": mask}), latent["samples"]
    right = torch.arange(init.shape[1]) % 2 == 1  # channel-major patchify: (c, dy, dx), dx = 1 is the right cell
    assert torch.equal(out[:, right, :, 4], init[:, right, :, 4])
    assert (out[:, ~right, :, 4] - init[:, ~right, :, 4]).abs().max() > 0.05
