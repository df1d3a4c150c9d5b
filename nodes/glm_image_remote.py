"""GLM-Image Remote: GLM-Image from a vLLM-Omni server. Thin over samplers/glm_image_remote.py."""

from __future__ import annotations

from ..samplers import glm_image
from ..samplers import glm_image_remote as remote
from .common import size_validator
from .remote_image import CAT, prompt_input, sampling_inputs, server_inputs, timeout_input


class LetterpressGlmImageRemote:
    DESCRIPTION = ("GLM-Image on a vLLM-Omni server (vllm serve zai-org/GLM-Image --omni: the AR model and the DiT "
                   "on GPUs of their own), through its OpenAI images API: POST /v1/images/generations, or with a "
                   "reference image (editing) POST /v1/images/edits; the seed reaches both stages. vLLM-Omni takes one "
                   "reference image for GLM-Image: a second is refused before sending. One image per request: a batch "
                   "is several requests (seed, seed+1, ...), at most 'concurrency' at once. Cancel closes the connections.")
    CATEGORY = CAT
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "run"
    VALIDATE_INPUTS = size_validator(glm_image.check_size, glm_image.SCALE)

    @classmethod
    def INPUT_TYPES(cls):
        refs = {f"reference_{i}": ("IMAGE", {"tooltip": "A reference image for editing (sent as a PNG file to "
                                                         "/v1/images/edits). vLLM-Omni takes one for GLM-Image: wire one "
                                                         "image in all (every frame of a batch counts as one)."})
                for i in range(1, remote.MAX_REFERENCES + 1)}
        return {
            "required": {
                **server_inputs("http://127.0.0.1:8091/v1", remote.SERVED_AS, "vLLM-Omni"),
                **prompt_input(""),
                **sampling_inputs(50, 1.5, glm_image.SCALE, 64, "Images to make: one request each, seeds seed, seed+1, ..."),
                "concurrency": ("INT", {"default": 2, "min": 1, "max": 16,
                                        "tooltip": "Requests in flight at once (the server queues the rest anyway; "
                                                   "this keeps its queue short)."}),
                **timeout_input(),
            },
            "optional": refs,
        }

    def run(self, base_url, model_name, api_key, prompt, width, height, steps, guidance, seed, batch_size, concurrency,
            timeout, **references):
        refs = [references.get(f"reference_{i}") for i in range(1, remote.MAX_REFERENCES + 1)]
        return (remote.generate(base_url, model_name, api_key, prompt, width, height, steps, guidance, seed,
                                batch_size, concurrency, timeout, refs),)


NODES = {"LetterpressGlmImageRemote": LetterpressGlmImageRemote}
DISPLAY_NAMES = {"LetterpressGlmImageRemote": "GLM-Image Remote (vLLM-Omni)"}
