"""ERNIE-Image and ERNIE-Image-Turbo nodes: one stage each, thin over loaders/ and samplers/."""

from __future__ import annotations

from ..loaders import ernie_image as load
from ..loaders.files import resolve
from ..loaders.host import get_host
from ..samplers import ernie_image as stage
from .common import (
    CATEGORY,
    EmptyLatentNode,
    FileLoader,
    VAEDecodeNode,
    VAEEncodeNode,
    cfg_input,
    denoise_input,
    dtype_input,
    folder_input,
    folder_validator,
    hosted,
    require,
    seed_input,
    size_input,
    size_validator,
    steps_input,
    weight_storage,
)
from .dit_options import compile_node, lora_loader
from .training import apply_trained_node, train_lora_node

CAT = f"{CATEGORY}/ERNIE-Image"
DIT, TE, VAE, PE = "LP_ERNIE_DIT", "LP_ERNIE_TEXT_ENCODER", "LP_ERNIE_VAE", "LP_ERNIE_PROMPT_ENHANCER"
COND = "LP_CONDITIONING"


class LetterpressErnieImageDiTLoader(FileLoader):
    DESCRIPTION = "Loads the ERNIE-Image (or -Turbo) DiT from a single file in models/diffusion_models."
    CATEGORY = CAT
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    KIND, INPUT = "diffusion_models", "dit_name"
    FAMILY, ROLE, LOADER = "ernie_image", "dit", "the ERNIE-Image DiT Loader"
    TOOLTIP = 'ernie-image.safetensors or ernie-image-turbo.safetensors.'
    LOAD = staticmethod(load.load_dit)


class LetterpressErnieImageTextEncoderLoader(FileLoader):
    DESCRIPTION = ("Loads the Ministral-3 3B text encoder from models/text_encoders. Its tokenizer comes from "
                   "the ERNIE-Image diffusers folder or a folder named like the file (see README).")
    CATEGORY = CAT
    RETURN_TYPES = (TE,)
    RETURN_NAMES = ("text_encoder",)
    KIND, INPUT = "text_encoders", "text_encoder_name"
    FAMILY, ROLE, LOADER = "ernie_image", "text_encoder", "the ERNIE-Image Text Encoder Loader"
    TOOLTIP = 'ministral-3-3b.safetensors.'
    LOAD = staticmethod(load.load_text_encoder)


class LetterpressErnieImagePromptEnhancerLoader(FileLoader):
    DESCRIPTION = "Loads the optional 3B prompt enhancer (Ministral-3) that rewrites short prompts into detailed ones."
    CATEGORY = CAT
    RETURN_TYPES = (PE,)
    RETURN_NAMES = ("prompt_enhancer",)
    KIND, INPUT = "text_encoders", "prompt_enhancer_name"
    FAMILY, ROLE, LOADER = "ernie_image", "prompt_enhancer", "the ERNIE-Image Prompt Enhancer Loader"
    TOOLTIP = 'ernie-image-prompt-enhancer.safetensors.'
    LOAD = staticmethod(load.load_prompt_enhancer)


class LetterpressErnieImageVAELoader(FileLoader):
    DESCRIPTION = "Loads the Flux2 VAE (32 channels) that ERNIE-Image decodes with, from models/vae."
    CATEGORY = CAT
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    KIND, INPUT = "vae", "vae_name"
    FAMILY, ROLE, LOADER = "ernie_image", "vae", "the ERNIE-Image VAE Loader"
    TOOLTIP = 'flux2-vae.safetensors.'
    LOAD = staticmethod(load.load_flux2_vae)


class LetterpressErnieImageFolderLoader:
    DESCRIPTION = ("Loads every ERNIE-Image stage from a Hugging Face folder in models/diffusers "
                   "(baidu/ERNIE-Image or ERNIE-Image-Turbo). The prompt enhancer output is empty when the "
                   "folder has none or it is switched off.")
    CATEGORY = CAT
    RETURN_TYPES = (DIT, TE, VAE, PE)
    RETURN_NAMES = ("dit", "text_encoder", "vae", "prompt_enhancer")
    FUNCTION = "run"
    # what the loader reads of the folder (what --download fetches): the stages, and pe/ when switched on
    FAMILY, PARTS = load.FAMILY, ("transformer", "text_encoder", "tokenizer", "vae")
    PARTS_IF = {"load_prompt_enhancer": ("pe", "pe_tokenizer")}
    VALIDATE_INPUTS = folder_validator(load.FAMILY, "the ERNIE-Image Folder Loader", PARTS)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": folder_input(load.PIPELINE_CLASSES, "An ERNIE-Image folder under models/diffusers."),
            "weight_dtype": dtype_input(),
            "load_prompt_enhancer": ("BOOLEAN", {"default": False, "tooltip": "Also load pe/ (3B) if the folder has it."}),
        }}

    def run(self, folder, weight_dtype, load_prompt_enhancer):
        storage = weight_storage(weight_dtype)
        m = load.load_folder(resolve("diffusers", folder), storage, with_pe=load_prompt_enhancer)
        return hosted(m["dit"], m["text_encoder"], m["vae"], m["prompt_enhancer"])


class LetterpressErnieImageTextEncode:
    DESCRIPTION = "Encodes a prompt with the Ministral-3 text encoder (penultimate hidden layer, as ERNIE-Image was trained)."
    CATEGORY = CAT
    RETURN_TYPES = (COND,)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TE, {"tooltip": "The Ministral-3 text encoder from an ERNIE-Image loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt; an empty one is valid (use it as the negative)."}),
        }}

    def run(self, text_encoder, prompt):
        get_host().load(text_encoder)
        return (stage.encode_text(text_encoder, prompt),)


class LetterpressErnieImagePromptEnhance:
    DESCRIPTION = ("Rewrites a short prompt into the detailed kind ERNIE-Image was trained on, using the prompt "
                   "enhancer. The result is a STRING you can read, edit and wire into Text Encode.")
    CATEGORY = CAT
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt_enhancer": (PE, {"tooltip": "The prompt enhancer from the Folder Loader (load_prompt_enhancer) or its own loader."}),
            "prompt": ("STRING", {"multiline": True, "tooltip": "Your short prompt; the enhancer rewrites it into a detailed one."}),
            "width": size_input(1024, 16, "Target width"),
            "height": size_input(1024, 16, "Target height"),
            "seed": seed_input(),
            "temperature": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "0 = greedy decoding."}),
            "top_p": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Nucleus sampling (reference: 0.95)."}),
            "max_new_tokens": ("INT", {"default": 1024, "min": 1, "max": 8192, "tooltip": "Longest rewrite, in tokens."}),
        }}

    def run(self, prompt_enhancer, prompt, width, height, seed, temperature, top_p, max_new_tokens):
        pe = require(prompt_enhancer, "prompt enhancer", "load one with the Prompt Enhancer Loader, or enable it in the Folder Loader")
        stage.check_size(width, height)
        get_host().load(pe)
        return (stage.enhance_prompt(pe, prompt, width, height, seed, temperature, top_p, max_new_tokens),)


class LetterpressErnieImageEmptyLatent(EmptyLatentNode):
    DESCRIPTION = "An empty ERNIE-Image latent (128 channels at 1/16 size) for text-to-image."
    CATEGORY = CAT
    EMPTY = staticmethod(stage.empty_latent)
    VALIDATE_INPUTS = size_validator(stage.check_size, 16)


class LetterpressErnieImageSampler:
    DESCRIPTION = ("Denoises with the ERNIE-Image DiT (flow matching, Euler). Model cards: ERNIE-Image 50 steps, "
                   "CFG 4.0; ERNIE-Image-Turbo 8 steps, CFG 1.0 (CFG 1 skips the negative pass).")
    CATEGORY = CAT
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "The ERNIE-Image DiT from a loader (or a LoRA / Torch Compile node)."}),
                "positive": (COND, {"tooltip": "ERNIE-Image Text Encode of the prompt."}),
                "latent": ("LATENT", {"tooltip": "ERNIE-Image Empty Latent, or VAE Encode for image-to-image."}),
                "seed": seed_input(),
                "steps": steps_input(50, "50 for ERNIE-Image, 8 for Turbo."),
                "cfg": cfg_input(4.0, "4.0 for ERNIE-Image, 1.0 for Turbo."),
                "shift": ("FLOAT", {"default": 4.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip": "Static timestep shift (hub scheduler config: 4.0)."}),
                "denoise": denoise_input(),
            },
            "optional": {"negative": (COND, {"tooltip": "Needed when cfg > 1; an empty prompt is the reference default."})},
        }

    def run(self, dit, positive, latent, seed, steps, cfg, shift, denoise, negative=None):
        get_host().load(dit, memory_required=stage.memory_required(dit, positive, negative, latent, cfg))
        return (stage.sample(dit, positive, negative, latent, seed, steps, cfg, shift, denoise),)


class LetterpressErnieImageVAEDecode(VAEDecodeNode):
    DESCRIPTION = "Decodes ERNIE-Image latents to an IMAGE with the Flux2 VAE."
    CATEGORY = CAT
    VAE_TYPE = VAE
    DECODE = staticmethod(stage.decode)
    LATENT_SCALE = stage.SCALE  # latents are 2x2-patchified: 16 pixels a side


class LetterpressErnieImageVAEEncode(VAEEncodeNode):
    DESCRIPTION = "Encodes an IMAGE into ERNIE-Image latents, for image-to-image with denoise below 1."
    CATEGORY = CAT
    VAE_TYPE = VAE
    ENCODE = staticmethod(stage.encode)


def _training_preview(te, vae, prompt, size, seed):
    """Train LoRA's samples: the prompt (and the empty negative) encoded once; each sample at CFG 4, shift 4."""
    encode = LetterpressErnieImageTextEncode()
    pos, neg = encode.run(te, prompt)[0], encode.run(te, "")[0]
    latent = LetterpressErnieImageEmptyLatent().run(size, size, 1)[0]

    def draw(dit, steps):
        out = LetterpressErnieImageSampler().run(dit, pos, latent, seed, steps, 4.0, 4.0, 1.0, neg)[0]
        return LetterpressErnieImageVAEDecode().run(vae, out)[0]

    return draw


LetterpressErnieImageTrainLoRA = train_lora_node(
    "LetterpressErnieImageTrainLoRA", "ERNIE-Image",
    "Trains a LoRA on the ERNIE-Image DiT from a dataset of images and captions, as DiffSynth-Studio trains it (flow "
    "matching, timesteps drawn from the shifted 1000-step schedule, its timestep weighting; AdamW). Latents and text "
    "encodings are computed once, then the DiT trains with the text encoder and VAE left for the memory manager to "
    "unload. Works on bf16, fp8 and quantized (GGUF) DiTs: the frozen weights stay as they are stored. Cancel stops "
    "within one step and writes the LoRA of the steps done to output/loras.",
    {"dit": (DIT, "The ERNIE-Image DiT to train on (a LoRA chained before it is kept under it)."),
     "text_encoder": (TE, "The Ministral-3 text encoder, to encode the captions."),
     "vae": (VAE, "The Flux2 VAE, to encode the images.")},
    lambda: {"shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1, "tooltip":
                                 "Static shift of the training schedule (DiffSynth-Studio's ERNIE-Image default 3.0)."})},
    stage.encode_dataset, stage.training_family, _training_preview)
LetterpressErnieImageApplyTrainedLoRA = apply_trained_node("LetterpressErnieImageApplyTrainedLoRA", "ERNIE-Image", DIT,
                                                           stage.FAMILY)
LetterpressErnieImageLoraLoader = lora_loader("LetterpressErnieImageLoraLoader", "ERNIE-Image", DIT)
LetterpressErnieImageCompile = compile_node("LetterpressErnieImageCompile", "ERNIE-Image", DIT)

NODES = {c.__name__: c for c in (
    LetterpressErnieImageLoraLoader, LetterpressErnieImageCompile,
    LetterpressErnieImageFolderLoader, LetterpressErnieImageDiTLoader, LetterpressErnieImageTextEncoderLoader,
    LetterpressErnieImageVAELoader, LetterpressErnieImagePromptEnhancerLoader, LetterpressErnieImageTextEncode,
    LetterpressErnieImagePromptEnhance, LetterpressErnieImageEmptyLatent, LetterpressErnieImageSampler,
    LetterpressErnieImageVAEDecode, LetterpressErnieImageVAEEncode, LetterpressErnieImageTrainLoRA,
    LetterpressErnieImageApplyTrainedLoRA,
)}
DISPLAY_NAMES = {
    "LetterpressErnieImageFolderLoader": "ERNIE-Image Folder Loader",
    "LetterpressErnieImageDiTLoader": "ERNIE-Image DiT Loader",
    "LetterpressErnieImageTextEncoderLoader": "ERNIE-Image Text Encoder Loader",
    "LetterpressErnieImageVAELoader": "ERNIE-Image VAE Loader",
    "LetterpressErnieImagePromptEnhancerLoader": "ERNIE-Image Prompt Enhancer Loader",
    "LetterpressErnieImageTextEncode": "ERNIE-Image Text Encode",
    "LetterpressErnieImagePromptEnhance": "ERNIE-Image Prompt Enhance",
    "LetterpressErnieImageEmptyLatent": "ERNIE-Image Empty Latent",
    "LetterpressErnieImageSampler": "ERNIE-Image DiT Sample",
    "LetterpressErnieImageVAEDecode": "ERNIE-Image VAE Decode",
    "LetterpressErnieImageVAEEncode": "ERNIE-Image VAE Encode",
    "LetterpressErnieImageLoraLoader": "ERNIE-Image LoRA Loader",
    "LetterpressErnieImageCompile": "ERNIE-Image Torch Compile",
    "LetterpressErnieImageTrainLoRA": "ERNIE-Image Train LoRA",
    "LetterpressErnieImageApplyTrainedLoRA": "ERNIE-Image Apply Trained LoRA",
}

from . import ernie_image_remote  # noqa: E402  (the Remote node: ERNIE-Image on an SGLang Diffusion server)

NODES.update(ernie_image_remote.NODES)
DISPLAY_NAMES.update(ernie_image_remote.DISPLAY_NAMES)
