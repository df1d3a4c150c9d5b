"""GLM-Image on a vLLM-Omni server, through its OpenAI images API (the engine-generic part is
samplers/remote_image.py): `POST {base}/images/generations`, or `POST {base}/images/edits` (multipart) with a
reference image; one image per request, seed + k for the k-th, at most `concurrency` in flight. vLLM-Omni 0.30.0
takes one reference image for GLM-Image (its edits endpoint refuses more, its pipeline conditions on one), so a
second is refused here before anything is sent rather than dropped.

The requests, each field where the engine's code reads it: vLLM-Omni 0.30.0 serving GLM-Image (two stages: AR and
DiT), `POST /v1/images/generations` (JSON, text to image) and `POST /v1/images/edits` (multipart form, one reference
image): vllm_omni/entrypoints/openai/api_server.py `generate_images` / `edit_images` read `model` (a name other than
the served one is a 400), `prompt`, `n`, `size`, `response_format`, `output_format`, `num_inference_steps`,
`guidance_scale`, `seed` and (edits) `image`, and hand them to serving_chat.py `generate_diffusion_images`, whose
`_build_multistage_generation_inputs` sets the seed on the AR stage and the DiT and size, steps, guidance and count
on the DiT. Fields outside protocol/images.py `ImageGenerationRequest` are dropped without a word (pydantic's
default), hence no `extra_body` here. Its /v1/chat/completions, which the GLM-Image serving page shows, reads the
seed only from the top level and only for the AR stage, never reads guidance_scale, and keeps only the first
reference image (serving_chat.py `_create_chat_completion`), so it is not used.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..loaders.errors import LetterpressError
from . import glm_image
from .images import check_image
from .remote_image import IMAGES_API, check_common, check_served_model, run_requests, stack
from .images import to_pil
from .remote_openai import Exchange, endpoint
from .remote_requests import images_fields, multipart, png_bytes

MAX_REFERENCES = 4  # the node's reference inputs
SERVER_MAX_REFERENCES = 1  # vLLM-Omni 0.30.0 for GLM-Image (api_server.py edit_images, images/helpers.py)
SERVED_AS = "zai-org/GLM-Image"  # the model path of the serving command the node suggests


def vllm_omni_request(model: str, prompt: str, width: int, height: int, steps: int, guidance: float,
                      seed: int) -> dict:
    """The JSON body of vLLM-Omni's POST /v1/images/generations for GLM-Image: one image (its DiT draws one
    image per request whatever n says, pipeline_glm_image.py `forward`: batch_size = 1)."""
    return images_fields(model, prompt, width, height, 1, steps, guidance, seed)


def vllm_omni_edit_form(model: str, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
                        reference_png: bytes) -> tuple[bytes, str]:
    """vLLM-Omni's POST /v1/images/edits form for GLM-Image: the same fields as form values and the reference
    (`png_bytes` of it, encoded once for a batch) as the `image` file. Returns (body, content type)."""
    fields = {k: str(v) for k, v in vllm_omni_request(model, prompt, width, height, steps, guidance, seed).items()}
    return multipart(fields, [("image", "reference.png", "image/png", reference_png)])


def reference_images(references: list) -> list[Image.Image]:
    """The wired reference batches, one picture per frame, in order; at most what the server takes."""
    frames = []
    for k, batch in enumerate(references):
        if batch is not None:
            batch = check_image(batch, f"GLM-Image Remote reference_{k + 1}")
            frames.extend(to_pil(batch))
    if len(frames) > SERVER_MAX_REFERENCES:
        raise LetterpressError(
            f"GLM-Image Remote got {len(frames)} reference images (a batch counts one per frame), and vLLM-Omni takes "
            f"{SERVER_MAX_REFERENCES} for GLM-Image: its /v1/images/edits refuses more (\"Only a single image is "
            "supported by this model\", release 0.30.0) and its GLM-Image pipeline conditions on one. Wire one "
            "image; the local GLM-Image nodes take up to 4.")
    return frames


def generate(base_url: str, model: str, api_key: str, prompt: str, width: int, height: int, steps: int,
             guidance: float, seed: int, batch_size: int, concurrency: int, timeout: float,
             references: list) -> torch.Tensor:
    """GLM-Image from vLLM-Omni: one request per image (seed + k), at most `concurrency` at a time; text to
    image through /images/generations, editing through /images/edits."""
    check_common(model, prompt, steps, guidance, seed, batch_size, timeout, SERVED_AS)
    glm_image.check_size(width, height)  # as the local nodes check it, before any request
    if not isinstance(concurrency, int) or concurrency < 1:
        raise LetterpressError(f"concurrency must be at least 1, got {concurrency}.")
    refs = reference_images(references)
    model, api_key = model.strip(), api_key.strip()
    url = endpoint(base_url, "/images/edits" if refs else "/images/generations")
    check_served_model(base_url, model, api_key, timeout)
    exchanges = []
    reference = png_bytes(refs[0]) if refs else None  # one PNG for the whole batch: only the seed changes
    for k in range(batch_size):
        if refs:
            form, ctype = vllm_omni_edit_form(model, prompt, width, height, steps, guidance, seed + k, reference)
            exchanges.append(Exchange(url, form, api_key, timeout, content_type=ctype))
        else:
            body = vllm_omni_request(model, prompt, width, height, steps, guidance, seed + k)
            exchanges.append(Exchange(url, body, api_key, timeout))
    images = run_requests(url, exchanges, timeout, concurrency, [1] * batch_size, model, IMAGES_API)
    return stack(images, width, height, url)
