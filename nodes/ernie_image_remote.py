"""ERNIE-Image Remote: ERNIE-Image(-Turbo) from an SGLang Diffusion server. Thin over samplers/ernie_image_remote.py."""

from __future__ import annotations

from ..samplers import ernie_image
from ..samplers import ernie_image_remote as remote
from .common import size_validator
from .remote_image import CAT, prompt_input, sampling_inputs, server_inputs, timeout_input


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
            **server_inputs("http://127.0.0.1:30000/v1", remote.SERVED_AS, "SGLang Diffusion"),
            **prompt_input(""),
            **sampling_inputs(8, 1.0, ernie_image.SCALE, remote.SGLANG_MAX_N,
                              "Images in one request (sent as n; SGLang makes at most 10 per request)."),
            "prompt_enhancer": ("BOOLEAN", {"default": False, "tooltip": "Sent as use_pe: the server rewrites the "
                                            "prompt with ERNIE-Image's prompt enhancer first (SGLang's own default is on)."}),
            **timeout_input(),
        }}

    def run(self, base_url, model_name, api_key, prompt, width, height, steps, guidance, seed, batch_size,
            prompt_enhancer, timeout):
        return (remote.generate(base_url, model_name, api_key, prompt, width, height, steps, guidance, seed,
                                batch_size, timeout, prompt_enhancer),)


NODES = {"LetterpressErnieImageRemote": LetterpressErnieImageRemote}
DISPLAY_NAMES = {"LetterpressErnieImageRemote": "ERNIE-Image Remote (SGLang Diffusion)"}
