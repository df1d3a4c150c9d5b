"""ERNIE-Image(-Turbo) on an SGLang Diffusion server, through its OpenAI images API (the engine-generic part is
samplers/remote_image.py): one `POST {base}/images/generations` with n = batch_size (SGLang makes output k with
seed + k; at most 10 per request). The answer is `{"data": [{"b64_json": ...}, ...]}`; another count is an error.

The request, each field where the engine's code reads it: SGLang Diffusion 0.5.23, `POST /v1/images/generations`
(JSON): python/sglang/multimodal_gen/runtime/entrypoints/openai/image_api.py `generations` reads `prompt`, `n`
(clamped to 1..10; output k gets seed + k, runtime/pipelines_core/stages/input_validation.py `_generate_seeds`),
`size` ("WxH", utils.py `build_sampling_params`), `response_format`, `output_format`, `num_inference_steps`,
`guidance_scale`, `seed`; `use_pe` is read only because configs/sample/ernie_image.py
`ErnieImageSamplingParams.image_request_extra_fields` declares it (utils.py `request_model_kwargs`). `model` is
accepted (protocol.py `ImageGenerationsRequest`) and never read: the node checks it against `GET /v1/models` first
(samplers/remote_image.py).
"""

from __future__ import annotations

import torch

from ..loaders.errors import LetterpressError
from . import ernie_image
from .remote_image import IMAGES_API, check_common, check_served_model, run_requests, stack
from .remote_openai import Exchange, endpoint
from .remote_requests import images_fields

SGLANG_MAX_N = 10  # SGLang: num_outputs_per_prompt = max(1, min(n, 10))
SERVED_AS = "baidu/ERNIE-Image-Turbo"  # the model path of the serving command the node suggests


def sglang_request(model: str, prompt: str, width: int, height: int, n: int, steps: int, guidance: float,
                   seed: int, prompt_enhancer: bool) -> dict:
    """The JSON body of SGLang Diffusion's POST /v1/images/generations for ERNIE-Image (one request, n images)."""
    return {**images_fields(model, prompt, width, height, n, steps, guidance, seed), "use_pe": bool(prompt_enhancer)}


def generate(base_url: str, model: str, api_key: str, prompt: str, width: int, height: int, steps: int,
             guidance: float, seed: int, batch_size: int, timeout: float, prompt_enhancer: bool = False) -> torch.Tensor:
    """ERNIE-Image(-Turbo) from SGLang Diffusion: one request with n = batch_size (seeds seed .. seed+n-1)."""
    url = endpoint(base_url, "/images/generations")
    check_common(model, prompt, steps, guidance, seed, batch_size, timeout, SERVED_AS)
    ernie_image.check_size(width, height)  # as the local nodes check it, before any request
    if batch_size > SGLANG_MAX_N:
        raise LetterpressError(f"batch_size {batch_size} is above {SGLANG_MAX_N}, the most images SGLang makes per "
                               "request (it clamps n). Use 10 or fewer, or chain a second node.")
    model, api_key = model.strip(), api_key.strip()
    check_served_model(base_url, model, api_key, timeout)
    body = sglang_request(model, prompt, width, height, batch_size, steps, guidance, seed, prompt_enhancer)
    images = run_requests(url, [Exchange(url, body, api_key, timeout)], timeout, 1, [batch_size], model, IMAGES_API)
    return stack(images, width, height, url)
