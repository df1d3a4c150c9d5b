"""The requests the Remote Image nodes send, each field where the engine's code reads it (README "Past one
machine" has the same table for users):

- SGLang Diffusion 0.5.23, `POST /v1/images/generations` (JSON): python/sglang/multimodal_gen/runtime/entrypoints/
  openai/image_api.py `generations` reads `prompt`, `n` (clamped to 1..10; output k gets seed + k,
  runtime/pipelines_core/stages/input_validation.py `_generate_seeds`), `size` ("WxH", utils.py
  `build_sampling_params`), `response_format`, `output_format`, `num_inference_steps`, `guidance_scale`, `seed`;
  `use_pe` is read only because configs/sample/ernie_image.py `ErnieImageSamplingParams.image_request_extra_fields`
  declares it (utils.py `request_model_kwargs`). `model` is accepted (protocol.py `ImageGenerationsRequest`) and
  never read: the node checks it against `GET /v1/models` first (samplers/remote_image.py).
- vLLM-Omni 0.30.0 serving GLM-Image (two stages: AR and DiT), `POST /v1/images/generations` (JSON, text to
  image) and `POST /v1/images/edits` (multipart form, one reference image): vllm_omni/entrypoints/openai/
  api_server.py `generate_images` / `edit_images` read `model` (a name other than the served one is a 400),
  `prompt`, `n`, `size`, `response_format`, `output_format`, `num_inference_steps`, `guidance_scale`, `seed` and
  (edits) `image`, and hand them to serving_chat.py `generate_diffusion_images`, whose
  `_build_multistage_generation_inputs` sets the seed on the AR stage and the DiT and size, steps, guidance and
  count on the DiT. Fields outside protocol/images.py `ImageGenerationRequest` are dropped without a word
  (pydantic's default), hence no `extra_body` here. Its /v1/chat/completions, which the GLM-Image serving page
  shows, reads the seed only from the top level and only for the AR stage, never reads guidance_scale, and keeps
  only the first reference image (serving_chat.py `_create_chat_completion`), so it is not used.
"""

from __future__ import annotations

import io
import uuid

from PIL import Image

SEED_MASK = 0x7FFFFFFFFFFFFFFF  # both engines take the seed as a signed 64-bit integer (SGLang: >= 0)


def _common(model: str, prompt: str, width: int, height: int, n: int, steps: int, guidance: float,
            seed: int) -> dict:
    return {"model": model, "prompt": prompt, "n": int(n), "size": f"{int(width)}x{int(height)}",
            "response_format": "b64_json", "output_format": "png", "num_inference_steps": int(steps),
            "guidance_scale": float(guidance), "seed": int(seed) & SEED_MASK}


def sglang_request(model: str, prompt: str, width: int, height: int, n: int, steps: int, guidance: float,
                   seed: int, prompt_enhancer: bool) -> dict:
    """The JSON body of SGLang Diffusion's POST /v1/images/generations for ERNIE-Image (one request, n images)."""
    return {**_common(model, prompt, width, height, n, steps, guidance, seed), "use_pe": bool(prompt_enhancer)}


def vllm_omni_request(model: str, prompt: str, width: int, height: int, steps: int, guidance: float,
                      seed: int) -> dict:
    """The JSON body of vLLM-Omni's POST /v1/images/generations for GLM-Image: one image (its DiT draws one
    image per request whatever n says, pipeline_glm_image.py `forward`: batch_size = 1)."""
    return _common(model, prompt, width, height, 1, steps, guidance, seed)


def vllm_omni_edit_form(model: str, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
                        reference_png: bytes) -> tuple[bytes, str]:
    """vLLM-Omni's POST /v1/images/edits form for GLM-Image: the same fields as form values and the reference
    (`png_bytes` of it, encoded once for a batch) as the `image` file. Returns (body, content type)."""
    fields = {k: str(v) for k, v in vllm_omni_request(model, prompt, width, height, steps, guidance, seed).items()}
    return multipart(fields, [("image", "reference.png", "image/png", reference_png)])


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], files: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578): text fields, then files as (field, file name, type, bytes)."""
    boundary = f"letterpress-{uuid.uuid4().hex}"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode("utf-8") + b"\r\n")
    for name, filename, ctype, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
