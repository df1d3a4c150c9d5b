"""What the requests of the Remote nodes share: the OpenAI images API fields both engines read, PNG and multipart
encoding. Each family's samplers/<key>_remote.py builds its engine's body on these, with where the engine's code
reads every field (README "Past one machine" has the same table for users).
"""

from __future__ import annotations

import io
import uuid

from PIL import Image

SEED_MASK = 0x7FFFFFFFFFFFFFFF  # both engines take the seed as a signed 64-bit integer (SGLang: >= 0)


def images_fields(model: str, prompt: str, width: int, height: int, n: int, steps: int, guidance: float,
                  seed: int) -> dict:
    """The JSON fields of a POST /v1/images/generations as both engines read them."""
    return {"model": model, "prompt": prompt, "n": int(n), "size": f"{int(width)}x{int(height)}",
            "response_format": "b64_json", "output_format": "png", "num_inference_steps": int(steps),
            "guidance_scale": float(guidance), "seed": int(seed) & SEED_MASK}


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
