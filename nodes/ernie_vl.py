"""ERNIE-4.5-VL nodes: images -> text (answer + reasoning), grounding boxes, and the same over an
OpenAI-compatible server. Thin over loaders/ernie_vl.py, samplers/ernie_vl.py and samplers/remote_openai.py."""

from __future__ import annotations

import logging

from ..loaders import ernie_vl as load
from ..loaders import ernie_vl_experts
from ..loaders.errors import LetterpressError
from ..loaders.files import list_model_folders, resolve
from ..loaders.host import get_host
from ..samplers import ernie_vl as vl
from ..samplers import ernie_vl_tools as tools
from ..samplers import ernie_vl_video as video_clip
from ..samplers import ernie_vl_remote as remote
from .common import CATEGORY, MAX_SEED, dtype_input, hosted, weight_storage

log = logging.getLogger(__name__)
CAT = f"{CATEGORY}/ERNIE-VL"
MODEL = load.SPEC.text_reader.io_type  # "LP_ERNIE_VL" (Read Text takes it too)
VIDEO_CLIP = "LP_ERNIE_VL_VIDEO"


def _model_input():
    return (MODEL, {"tooltip": "From ERNIE-VL Loader."})


def _images_input():
    return ("IMAGE", {"tooltip": "One or more images; a batch of several images is sent as several pictures."})


def _media_inputs() -> dict:
    """Generate's pictures and video, each optional (one of them is needed)."""
    return {
        "images": ("IMAGE", {"tooltip": "Optional with a video: one or more images; a batch of several images is sent "
                                        "as several pictures."}),
        "video": (VIDEO_CLIP, {"tooltip": "Optional: a video clip from ERNIE-VL Video (asked about together with the "
                                          "images, if any: pictures first, then the video)."}),
    }


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
                   "wires into an image model's text encode (prompt input). read the text in the image: OCR. "
                   "free question: the prompt alone. With a preset, the prompt adds extra instructions."}),
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The question, or extra instructions for a preset."}),
        "system_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Optional system prompt."}),
    }


def _check_images(images):
    if images is None or images.shape[0] == 0:
        raise LetterpressError("No image is wired: connect a LoadImage (or any IMAGE) to ERNIE-VL.")


def _check_media(images, video):
    if video is None:
        _check_images(images)
    elif images is not None and images.shape[0] == 0:
        raise LetterpressError("The images input holds no image: unwire it, or wire a LoadImage (or any IMAGE).")


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
            "experts": (ernie_vl_experts.CHOICES, {
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
    DESCRIPTION = ("Answers a prompt about one or more images and/or a video (from ERNIE-VL Video) with ERNIE-4.5-VL. "
                   "Outputs the answer and, separately, the reasoning (empty when thinking is off). Progress per token; "
                   "Cancel stops within one token.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("answer", "reasoning")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _model_input(), **_prompt_inputs(), **_generation_inputs()},
                "optional": _media_inputs()}

    # images first, as when it was required (callers pass it by position); ComfyUI passes everything by name
    def run(self, model, images=None, preset="free question", prompt="", system_prompt="", thinking=False,
            max_new_tokens=1024, temperature=0.0, top_p=0.8, seed=0, video=None):
        _check_media(images, video)
        text = vl.compose_prompt(preset, prompt)
        get_host().load(model)
        return vl.vl_generate(model, images, text, system_prompt, thinking, max_new_tokens, temperature, top_p, seed,
                              video)


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
                   "ERNIE-4.5-VL). Images go as base64 PNG; a video (from ERNIE-VL Video) as the frames the local node "
                   "would use, in vLLM's frame-list form (video_url data:video/jpeg;base64,frame,frame,...), without "
                   "their times. Outputs the answer and the reasoning.")
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
            **_prompt_inputs(), **_generation_inputs(),
            "stream": ("BOOLEAN", {"default": True, "tooltip": "Stream the answer (progress per chunk, quick Cancel)."}),
            "timeout": ("FLOAT", {"default": 300.0, "min": 1.0, "max": 3600.0, "step": 1.0,
                                  "tooltip": "Seconds to wait for the server (per read)."}),
        }, "optional": _media_inputs()}

    # images in its old place (callers pass it by position); ComfyUI passes everything by name
    def run(self, base_url, model_name, api_key, images=None, preset="free question", prompt="", system_prompt="",
            thinking=False, max_new_tokens=1024, temperature=0.0, top_p=0.8, seed=0, stream=True, timeout=300.0,
            video=None):
        _check_media(images, video)
        text = vl.compose_prompt(preset, prompt)
        return remote.remote_generate(base_url, model_name, api_key, images, text, system_prompt, thinking,
                                      max_new_tokens, temperature, top_p, seed, stream, timeout, video)


class LetterpressErnieVLVideo:
    DESCRIPTION = ("A video clip for ERNIE-VL Generate and Remote Generate: a batch of frames with the frame rate they "
                   "were taken at, or a ComfyUI VIDEO (Load Video). As the original ERNIE-4.5-VL processor does, the "
                   "model sees 2 frames per second (at least 16, at most 180, never more than the clip has), each "
                   "with its time drawn in its top-left corner (transformers' video processor with the model "
                   "folder's font, Roboto-Regular.ttf). Needs torchvision (ComfyUI has it).")
    CATEGORY = CAT
    RETURN_TYPES = (VIDEO_CLIP,)
    RETURN_NAMES = ("video",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sample_fps": ("FLOAT", {"default": video_clip.ORIGINAL_FPS, "min": 0.0, "max": 60.0, "step": 0.5,
                                     "tooltip": "Frames per second of the clip the model sees: 2 as in the original "
                                                "processor. 0 = transformers' default rule: every frame, up to the "
                                                "maximum of 180 (evenly spread over longer clips)."}),
        }, "optional": {
            "frames": ("IMAGE", {"tooltip": "The clip as a batch of frames (e.g. from a video loader), in order."}),
            "frame_rate": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 240.0, "step": 0.01,
                                     "tooltip": "Frames per second the frames input was taken at (its times and "
                                                "which frames are kept follow from it). Unused with a VIDEO."}),
            "video_file": ("VIDEO", {"tooltip": "Or the clip as a ComfyUI VIDEO (Load Video, Create Video): its "
                                                "frames and frame rate are used; its audio is not."}),
        }}

    def run(self, sample_fps, frames=None, frame_rate=24.0, video_file=None):
        return (video_clip.clip_from(frames, frame_rate, video_file, sample_fps),)


def _think_inputs() -> dict:
    gen = _generation_inputs(2048)
    del gen["thinking"]  # the loop is the Thinking model's: reasoning always on
    return {
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The question about the image."}),
        "system_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Optional system prompt."}),
        "max_tool_calls": ("INT", {"default": 4, "min": 0, "max": 32, "tooltip": "Most zoom calls the model may make; "
                                   "a call past it is not run and the loop ends (its reasoning is kept). 0: no zoom."}),
        **gen,
    }


_THINK_OUTPUTS = ("STRING", "STRING", "STRING", "IMAGE")
_THINK_NAMES = ("answer", "reasoning", "calls", "crops")
_THINK_DESCRIPTION = (
    "The zoom tool (image_zoom_in_tool) is declared to the model; when it asks for a region (0-1000 coordinates "
    "of the first image) the node crops it and gives the crop back as a new picture in the tool result, and the "
    "model reasons on, up to max_tool_calls. Outputs the final answer, every turn's reasoning with its calls, "
    "the calls as JSON (each call, and the zoomed regions as pixel boxes that ERNIE-VL Draw Boxes draws) and the crops as an IMAGE batch (each in the top-left corner of a "
    "canvas as large as the largest; the picture itself when the model zoomed nowhere). Image search is not offered: it would "
    "need a search service, and the pack makes no network call of its own.")


class LetterpressErnieVLThinkWithImages:
    DESCRIPTION = ("Think with Images on ERNIE-4.5-VL-28B-A3B-Thinking (local): the model reasons and zooms into the "
                   "picture. " + _THINK_DESCRIPTION + " Needs the Thinking model's own chat template (with tool "
                   "calling). Progress per token; Cancel stops within one token.")
    CATEGORY = CAT
    RETURN_TYPES = _THINK_OUTPUTS
    RETURN_NAMES = _THINK_NAMES
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _model_input(), "images": _images_input(), **_think_inputs()}}

    def run(self, model, images, prompt, system_prompt, max_tool_calls, max_new_tokens, temperature, top_p, seed):
        _check_images(images)
        text = vl.compose_prompt("free question", prompt)
        get_host().load(model)
        return tools.think_with_images(model, images, text, system_prompt, max_tool_calls, max_new_tokens,
                                       temperature, top_p, seed)


class LetterpressErnieVLRemoteThinkWithImages:
    DESCRIPTION = ("Think with Images through an OpenAI-compatible server serving ERNIE-4.5-VL-28B-A3B-Thinking with "
                   "a tool-call parser (vLLM: --tool-call-parser ernie45 --enable-auto-tool-choice; FastDeploy: "
                   "--tool-call-parser ernie-45-vl-thinking). " + _THINK_DESCRIPTION + " The node runs the zoom "
                   "itself and sends the crop back as a tool message holding the image (base64 PNG).")
    CATEGORY = CAT
    RETURN_TYPES = _THINK_OUTPUTS
    RETURN_NAMES = _THINK_NAMES
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        remote_inputs = LetterpressErnieVLRemoteGenerate.INPUT_TYPES()["required"]
        return {"required": {
            "base_url": remote_inputs["base_url"],
            "model_name": ("STRING", {"default": "baidu/ERNIE-4.5-VL-28B-A3B-Thinking",
                                      "tooltip": "The model name the server serves."}),
            "api_key": remote_inputs["api_key"], "images": _images_input(), **_think_inputs(),
            "stream": remote_inputs["stream"], "timeout": remote_inputs["timeout"],
        }}

    def run(self, base_url, model_name, api_key, images, prompt, system_prompt, max_tool_calls, max_new_tokens,
            temperature, top_p, seed, stream, timeout):
        _check_images(images)
        text = vl.compose_prompt("free question", prompt)
        return tools.remote_think_with_images(base_url, model_name, api_key, images, text, system_prompt,
                                              max_tool_calls, max_new_tokens, temperature, top_p, seed, stream, timeout)


NODES = {c.__name__: c for c in (
    LetterpressErnieVLLoader, LetterpressErnieVLGenerate, LetterpressErnieVLGround, LetterpressErnieVLParseBoxes,
    LetterpressErnieVLDrawBoxes, LetterpressErnieVLRemoteGenerate, LetterpressErnieVLVideo,
    LetterpressErnieVLThinkWithImages, LetterpressErnieVLRemoteThinkWithImages,
)}
DISPLAY_NAMES = {
    "LetterpressErnieVLLoader": "ERNIE-VL Loader",
    "LetterpressErnieVLGenerate": "ERNIE-VL Generate",
    "LetterpressErnieVLGround": "ERNIE-VL Ground (boxes)",
    "LetterpressErnieVLParseBoxes": "ERNIE-VL Parse Boxes",
    "LetterpressErnieVLDrawBoxes": "ERNIE-VL Draw Boxes",
    "LetterpressErnieVLRemoteGenerate": "ERNIE-VL Remote Generate (OpenAI API)",
    "LetterpressErnieVLVideo": "ERNIE-VL Video",
    "LetterpressErnieVLThinkWithImages": "ERNIE-VL Think with Images (zoom)",
    "LetterpressErnieVLRemoteThinkWithImages": "ERNIE-VL Remote Think with Images (OpenAI API)",
}
