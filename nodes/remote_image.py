"""Remote Image nodes: ERNIE-Image from SGLang Diffusion and GLM-Image from vLLM-Omni, both through the engines'
OpenAI images API, each returning an IMAGE like the local decoders. Thin over samplers/remote_image.py."""

from __future__ import annotations

from ..samplers import ernie_image, glm_image
from ..samplers import remote_image as remote
from .common import CATEGORY, MAX_SEED, size_input, size_validator

CAT = f"{CATEGORY}/Remote"


def _server_inputs(url: str, model: str, engine: str) -> dict:
    return {
        "base_url": ("STRING", {"default": url, "tooltip": f"The {engine} server's OpenAI base URL (ends in /v1). "
                                "Requests go to this address only: no redirect is followed, no proxy is used."}),
        "model_name": ("STRING", {"default": model, "tooltip": "The model name the server serves (its --served-model-name, "
                                  "else its model path). Checked against the server's GET /v1/models before generating."}),
        "api_key": ("STRING", {"default": "", "tooltip": "Sent as a Bearer token; leave empty for servers without keys."}),
    }


def _prompt_input(default: str) -> dict:
    return {"prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": default,
                                  "tooltip": "What to draw; put text to render in quotes."})}


def _sampling_inputs(steps: int, guidance: float, step: int, max_batch: int, batch_tip: str) -> dict:
    return {
        "width": size_input(1024, step, "Output width"),
        "height": size_input(1024, step, "Output height"),
        "steps": ("INT", {"default": steps, "min": 1, "max": 200, "tooltip": "Sent as num_inference_steps."}),
        "guidance": ("FLOAT", {"default": guidance, "min": 0.0, "max": 20.0, "step": 0.1,
                               "tooltip": "Sent as guidance_scale."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Sent to the server (the engine's own noise: it does not reproduce a local run)."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": max_batch, "tooltip": batch_tip}),
    }


def _timeout_input() -> dict:
    return {"timeout": ("FLOAT", {"default": 600.0, "min": 1.0, "max": 7200.0, "step": 1.0,
                                  "tooltip": "Seconds to wait for the server (per read): a whole image is one read."})}


class LetterpressErnieImageRemote:
    DESCRIPTION = ("ERNIE-Image or ERNIE-Image-Turbo on an SGLang Diffusion server (sglang serve --model-path "
                   "baidu/ERNIE-Image-Turbo --num-gpus N), through its OpenAI images API "
                   "(POST /v1/images/generations, b64_json). The batch is one request with n = batch_size. "
                   "Outputs an IMAGE for Read Text, Best of Batch, Save Image. Cancel closes the connection.")
    CATEGORY = CAT
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "run"
    VALIDATE_INPUTS = size_validator(ernie_image.check_size, ernie_image.SCALE)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_server_inputs("http://127.0.0.1:30000/v1", "baidu/ERNIE-Image-Turbo", "SGLang Diffusion"),
            **_prompt_input(""),
            **_sampling_inputs(8, 1.0, ernie_image.SCALE, remote.SGLANG_MAX_N,
                               "Images in one request (sent as n; SGLang makes at most 10 per request)."),
            "prompt_enhancer": ("BOOLEAN", {"default": False, "tooltip": "Sent as use_pe: the server rewrites the "
                                            "prompt with ERNIE-Image's prompt enhancer first (SGLang's own default is on)."}),
            **_timeout_input(),
        }}

    def run(self, base_url, model_name, api_key, prompt, width, height, steps, guidance, seed, batch_size,
            prompt_enhancer, timeout):
        return (remote.ernie_image_remote(base_url, model_name, api_key, prompt, width, height, steps, guidance, seed,
                                          batch_size, timeout, prompt_enhancer),)


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
                **_server_inputs("http://127.0.0.1:8091/v1", "zai-org/GLM-Image", "vLLM-Omni"),
                **_prompt_input(""),
                **_sampling_inputs(50, 1.5, glm_image.SCALE, 64,
                                   "Images to make: one request each, seeds seed, seed+1, ..."),
                "concurrency": ("INT", {"default": 2, "min": 1, "max": 16,
                                        "tooltip": "Requests in flight at once (the server queues the rest anyway; "
                                                   "this keeps its queue short)."}),
                **_timeout_input(),
            },
            "optional": refs,
        }

    def run(self, base_url, model_name, api_key, prompt, width, height, steps, guidance, seed, batch_size, concurrency,
            timeout, **references):
        refs = [references.get(f"reference_{i}") for i in range(1, remote.MAX_REFERENCES + 1)]
        return (remote.glm_image_remote(base_url, model_name, api_key, prompt, width, height, steps, guidance, seed,
                                        batch_size, concurrency, timeout, refs),)


NODES = {c.__name__: c for c in (LetterpressErnieImageRemote, LetterpressGlmImageRemote)}
DISPLAY_NAMES = {
    "LetterpressErnieImageRemote": "ERNIE-Image Remote (SGLang Diffusion)",
    "LetterpressGlmImageRemote": "GLM-Image Remote (vLLM-Omni)",
}
