"""The inputs every Remote image node shares (server, prompt, sampling, timeout): each family's
nodes/<key>_remote.py builds its node from them, over its samplers/<key>_remote.py, returning an IMAGE like the
local decoders."""

from __future__ import annotations

from .common import CATEGORY, MAX_SEED, size_input

CAT = f"{CATEGORY}/Remote"


def server_inputs(url: str, model: str, engine: str) -> dict:
    return {
        "base_url": ("STRING", {"default": url, "tooltip": f"The {engine} server's OpenAI base URL (ends in /v1). "
                                "Requests go to this address only: no redirect is followed, no proxy is used."}),
        "model_name": ("STRING", {"default": model, "tooltip": "The model name the server serves (its --served-model-name, "
                                  "else its model path). Checked against the server's GET /v1/models before generating."}),
        "api_key": ("STRING", {"default": "", "tooltip": "Sent as a Bearer token; leave empty for servers without keys."}),
    }


def prompt_input(default: str) -> dict:
    return {"prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": default,
                                  "tooltip": "What to draw; put text to render in quotes."})}


def sampling_inputs(steps: int, guidance: float, step: int, max_batch: int, batch_tip: str) -> dict:
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


def timeout_input() -> dict:
    return {"timeout": ("FLOAT", {"default": 600.0, "min": 1.0, "max": 7200.0, "step": 1.0,
                                  "tooltip": "Seconds to wait for the server (per read): a whole image is one read."})}
