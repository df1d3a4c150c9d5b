"""ERNIE-4.5-VL nodes: images -> text (answer + reasoning), grounding boxes, and the same over an
OpenAI-compatible server. Thin over loaders/ernie_vl.py, samplers/ernie_vl.py and samplers/remote_openai.py."""

from __future__ import annotations

import logging

from ..loaders import ernie_vl as load
from ..loaders import expert_offload
from ..loaders.errors import LetterpressError
from ..loaders.files import list_model_folders, resolve
from ..loaders.host import get_host
from ..samplers import ernie_vl as vl
from ..samplers import remote_openai as remote
from .common import CATEGORY, MAX_SEED, dtype_input, hosted, weight_storage

log = logging.getLogger(__name__)
CAT = f"{CATEGORY}/ERNIE-VL"
MODEL = "LP_ERNIE_VL"


def _model_input():
    return (MODEL, {"tooltip": "From ERNIE-VL Loader."})


def _images_input():
    return ("IMAGE", {"tooltip": "One or more images; a batch of several images is sent as several pictures."})


def _generation_inputs(max_tokens: int = 1024) -> dict:
    return {
        "thinking": ("BOOLEAN", {"default": False, "tooltip": "Let the model reason before answering (the Thinking "
                                 "variant is trained for it). The reasoning comes out separately; if max_new_tokens "
                                 "ends it before it closes, the answer is empty."}),
        "max_new_tokens": ("INT", {"default": max_tokens, "min": 1, "max": 32768, "tooltip": "Upper limit on generated tokens (reasoning included)."}),
        "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "0 = greedy decoding (reproducible); above 0 samples."}),
        "top_p": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Nucleus sampling; used when temperature > 0."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Sampling seed (no effect with temperature 0)."}),
    }


def _prompt_inputs() -> dict:
    return {
        "preset": (vl.PRESET_NAMES, {"default": "free question", "tooltip": "describe as text-to-image prompt: the answer "
                   "wires into an ERNIE-Image / Ovis-Image / GLM-Image text encode. read the text in the image: OCR. "
                   "free question: the prompt alone. With a preset, the prompt adds extra instructions."}),
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The question, or extra instructions for a preset."}),
        "system_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Optional system prompt."}),
    }


def _check_images(images):
    if images is None or images.shape[0] == 0:
        raise LetterpressError("No image is wired: connect a LoadImage (or any IMAGE) to ERNIE-VL.")


class LetterpressErnieVLLoader:
    DESCRIPTION = ("Loads ERNIE-4.5-VL-28B-A3B (-PT or -Thinking) from a transformers checkpoint folder in models/LLM "
                   "(Hugging Face layout: config.json, safetensors shards, tokenizer, preprocessor_config.json). "
                   "28B parameters in total: the memory manager keeps it off the GPU between runs.")
    CATEGORY = CAT
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "run"
    FAMILY, PARTS = load.FAMILY, ("",)  # a transformers folder: its own files, no subfolders

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": (list_model_folders("LLM", load.list_folders()), {
                "tooltip": "A folder under models/LLM, e.g. ERNIE-4.5-VL-28B-A3B-PT. ERNIE-4.5-VL folders are listed "
                           "first; picking another folder says what it holds and what to download instead."}),
            "weight_dtype": dtype_input(),
        }, "optional": {
            "experts": (expert_offload.CHOICES, {
                "default": "auto",
                "tooltip": "Where the routed experts (almost all of the 28B parameters; 6 of 64 run per token) are "
                           "kept. 'in CPU memory': only attention, the shared experts, the routers and the vision "
                           "encoder go to the GPU; each token's experts run on the CPU, or an expert's weights are "
                           "copied to the GPU when many tokens need it (a prompt's prefill). 'auto': in CPU memory "
                           "when the whole model does not fit the GPU."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        from ..loaders.explain import explain_llm_folder

        return explain_llm_folder(folder, load.FAMILY, "the ERNIE-VL Loader") or True

    def run(self, folder, weight_dtype, experts="auto"):
        storage = weight_storage(weight_dtype)
        model = load.load(resolve("LLM", folder), storage, experts)
        return hosted(model)


class LetterpressErnieVLGenerate:
    DESCRIPTION = ("Answers a prompt about one or more images with ERNIE-4.5-VL. Outputs the answer and, separately, "
                   "the reasoning (empty when thinking is off). Progress per token; Cancel stops within one token.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("answer", "reasoning")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _model_input(), "images": _images_input(), **_prompt_inputs(), **_generation_inputs()}}

    def run(self, model, images, preset, prompt, system_prompt, thinking, max_new_tokens, temperature, top_p, seed):
        _check_images(images)
        text = vl.compose_prompt(preset, prompt)
        get_host().load(model)
        return vl.vl_generate(model, images, text, system_prompt, thinking, max_new_tokens, temperature, top_p, seed)


class LetterpressErnieVLGround:
    DESCRIPTION = ("Finds the named objects in each image and returns their boxes as JSON (labels + pixel boxes "
                   "x1, y1, x2, y2 in the input image; the model answers on a 0..1000 scale). Wire the boxes into "
                   "ERNIE-VL Draw Boxes.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("boxes", "answer")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        gen = _generation_inputs(512)
        return {"required": {
            "model": _model_input(), "images": _images_input(),
            "objects": ("STRING", {"multiline": False, "default": "person", "tooltip": "Objects to find, comma-separated."}),
            **gen,
        }}

    def run(self, model, images, objects, thinking, max_new_tokens, temperature, top_p, seed):
        _check_images(images)
        text = vl.grounding_prompt(objects)
        labels = vl.object_names(objects)
        get_host().load(model)
        height, width = int(images.shape[1]), int(images.shape[2])
        boxes, answers, dropped = [], [], []
        for k in range(images.shape[0]):
            answer, _ = vl.vl_generate(model, images[k:k + 1], text, "", thinking, max_new_tokens, temperature, top_p, seed)
            answers.append(answer)
            boxes += vl.parse_boxes(answer, width, height, labels, image=k, dropped=dropped)
        return (vl.boxes_json(boxes, width, height, dropped), "\n".join(answers))


class LetterpressErnieVLParseBoxes:
    DESCRIPTION = ("Reads boxes out of a model answer (ERNIE <|LOC_n|> tokens, JSON with bbox_2d, or [x1, y1, x2, y2] "
                   "lists, on the 0..1000 scale) and returns them as pixel boxes of the image, e.g. for an answer from "
                   "ERNIE-VL Remote Generate. Boxes with no area inside the image are left out and listed under 'dropped'.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("boxes",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "answer": ("STRING", {"multiline": True, "forceInput": True, "tooltip": "The model's answer text."}),
            "images": ("IMAGE", {"tooltip": "The image the answer is about (its size scales the boxes)."}),
            "labels": ("STRING", {"default": "", "tooltip": "Optional comma-separated labels for boxes that have none."}),
        }}

    def run(self, answer, images, labels):
        height, width = int(images.shape[1]), int(images.shape[2])
        names = [o.strip() for o in labels.split(",") if o.strip()]
        dropped = []
        boxes = vl.parse_boxes(answer, width, height, names, dropped=dropped)
        note = vl.NO_BOXES_NOTE if not boxes and not dropped and answer.strip() else ""
        if note:
            log.warning("ERNIE-VL Parse Boxes: %s", note)
        return (vl.boxes_json(boxes, width, height, dropped, note),)


class LetterpressErnieVLDrawBoxes:
    DESCRIPTION = "Draws the boxes (JSON from ERNIE-VL Ground or Parse Boxes) on the images, with their labels."
    CATEGORY = CAT
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images the boxes were found on (or any size: boxes are rescaled)."}),
            "boxes": ("STRING", {"forceInput": True, "tooltip": "Boxes JSON from ERNIE-VL Ground or Parse Boxes."}),
            "line_width": ("INT", {"default": 3, "min": 1, "max": 64, "tooltip": "Outline width in pixels."}),
            "show_labels": ("BOOLEAN", {"default": True, "tooltip": "Write each box's label inside it."}),
        }}

    def run(self, images, boxes, line_width, show_labels):
        found = vl.read_boxes(boxes, int(images.shape[2]), int(images.shape[1]))  # scaled to these images' size
        return (vl.draw_boxes(images, found, line_width, show_labels),)


class LetterpressErnieVLRemoteGenerate:
    DESCRIPTION = ("The VL Generate request sent to an OpenAI-compatible server (vLLM, SGLang, FastDeploy serving "
                   "ERNIE-4.5-VL). Images go as base64 PNG. Outputs the answer and the reasoning.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("answer", "reasoning")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_url": ("STRING", {"default": "http://127.0.0.1:8000/v1", "tooltip": "The server's OpenAI base URL (ends in /v1)."}),
            "model_name": ("STRING", {"default": "baidu/ERNIE-4.5-VL-28B-A3B-PT", "tooltip": "The model name the server serves."}),
            "api_key": ("STRING", {"default": "", "tooltip": "Sent as a Bearer token; leave empty for servers without keys."}),
            "images": _images_input(), **_prompt_inputs(), **_generation_inputs(),
            "stream": ("BOOLEAN", {"default": True, "tooltip": "Stream the answer (progress per chunk, quick Cancel)."}),
            "timeout": ("FLOAT", {"default": 300.0, "min": 1.0, "max": 3600.0, "step": 1.0,
                                  "tooltip": "Seconds to wait for the server (per read)."}),
        }}

    def run(self, base_url, model_name, api_key, images, preset, prompt, system_prompt, thinking, max_new_tokens,
            temperature, top_p, seed, stream, timeout):
        _check_images(images)
        text = vl.compose_prompt(preset, prompt)
        return remote.remote_generate(base_url, model_name, api_key, images, text, system_prompt, thinking,
                                      max_new_tokens, temperature, top_p, seed, stream, timeout)


NODES = {c.__name__: c for c in (
    LetterpressErnieVLLoader, LetterpressErnieVLGenerate, LetterpressErnieVLGround, LetterpressErnieVLParseBoxes,
    LetterpressErnieVLDrawBoxes, LetterpressErnieVLRemoteGenerate,
)}
DISPLAY_NAMES = {
    "LetterpressErnieVLLoader": "ERNIE-VL Loader",
    "LetterpressErnieVLGenerate": "ERNIE-VL Generate",
    "LetterpressErnieVLGround": "ERNIE-VL Ground (boxes)",
    "LetterpressErnieVLParseBoxes": "ERNIE-VL Parse Boxes",
    "LetterpressErnieVLDrawBoxes": "ERNIE-VL Draw Boxes",
    "LetterpressErnieVLRemoteGenerate": "ERNIE-VL Remote Generate (OpenAI API)",
}
