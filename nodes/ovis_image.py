"""Ovis-Image nodes: one stage each, thin over loaders/ and samplers/."""

from __future__ import annotations

from ..loaders import ovis_image as load
from ..loaders.files import resolve
from ..loaders.host import get_host
from ..samplers import ovis_image as stage
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
    seed_input,
    size_validator,
    steps_input,
    weight_storage,
)
from .dit_options import compile_node, lora_loader
from .training import apply_trained_node, train_lora_node

CAT = f"{CATEGORY}/Ovis-Image"
DIT, TE, VAE = "LP_OVIS_DIT", "LP_OVIS_TEXT_ENCODER", "LP_OVIS_VAE"
COND = "LP_CONDITIONING"


class LetterpressOvisImageFolderLoader:
    DESCRIPTION = ("Loads every Ovis-Image stage (DiT, Ovis2.5 text encoder with its tokenizer, FLUX.1 VAE) from the "
                   "Hugging Face folder AIDC-AI/Ovis-Image-7B in models/diffusers.")
    CATEGORY = CAT
    RETURN_TYPES = (DIT, TE, VAE)
    RETURN_NAMES = ("dit", "text_encoder", "vae")
    FUNCTION = "run"
    FAMILY, PARTS = load.FAMILY, ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
    VALIDATE_INPUTS = folder_validator(load.FAMILY, "the Ovis-Image Folder Loader",
                                       tuple(p for p in PARTS if p != "scheduler"))  # without it: the defaults

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": folder_input(load.PIPELINE_CLASSES, "An Ovis-Image folder under models/diffusers (e.g. Ovis-Image-7B)."),
            "weight_dtype": dtype_input(),
        }}

    def run(self, folder, weight_dtype):
        storage = weight_storage(weight_dtype)
        m = load.load_folder(resolve("diffusers", folder), storage)
        return hosted(m["dit"], m["text_encoder"], m["vae"])


class LetterpressOvisImageDiTLoader(FileLoader):
    DESCRIPTION = ("Loads the Ovis-Image DiT from a single file in models/diffusion_models: the original "
                   "ovis_image.safetensors or ComfyUI's ovis_image_bf16.safetensors (converted on load).")
    CATEGORY = CAT
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    KIND, INPUT = "diffusion_models", "dit_name"
    FAMILY, ROLE, LOADER = "ovis_image", "dit", "the Ovis-Image DiT Loader"
    TOOLTIP = 'ovis_image.safetensors or ovis_image_bf16.safetensors.'
    LOAD = staticmethod(load.load_dit)


class LetterpressOvisImageTextEncoderLoader(FileLoader):
    DESCRIPTION = ("Loads the Ovis2.5 text encoder (a Qwen3 language model) from models/text_encoders, e.g. "
                   "ovis_2.5.safetensors. Its tokenizer comes from the Ovis-Image diffusers folder or a folder named "
                   "like the file.")
    CATEGORY = CAT
    RETURN_TYPES = (TE,)
    RETURN_NAMES = ("text_encoder",)
    KIND, INPUT = "text_encoders", "text_encoder_name"
    FAMILY, ROLE, LOADER = "ovis_image", "text_encoder", "the Ovis-Image Text Encoder Loader"
    TOOLTIP = 'ovis_2.5.safetensors.'
    LOAD = staticmethod(load.load_text_encoder)


class LetterpressOvisImageVAELoader(FileLoader):
    DESCRIPTION = "Loads the FLUX.1 VAE (16 channels) that Ovis-Image decodes with, from models/vae (ae.safetensors)."
    CATEGORY = CAT
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    KIND, INPUT = "vae", "vae_name"
    FAMILY, ROLE, LOADER = "ovis_image", "vae", "the Ovis-Image VAE Loader"
    TOOLTIP = 'ae.safetensors (the FLUX.1 VAE).'
    LOAD = staticmethod(load.load_flux1_vae)


class LetterpressOvisImageTextEncode:
    DESCRIPTION = ("Encodes a prompt and a negative prompt the way Ovis-Image was trained: the instruction prefix and "
                   "the chat template (thinking off), last hidden state, padded to max_sequence_length.")
    CATEGORY = CAT
    RETURN_TYPES = (COND, COND)
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TE, {"tooltip": "The Ovis2.5 text encoder from an Ovis-Image loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "What the image should show."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Used when cfg > 1. The reference default is empty."}),
            "max_sequence_length": ("INT", {"default": 256, "min": 1, "max": 256,
                                            "tooltip": "Prompt tokens kept (at most 256, as trained); longer prompts are cut."}),
        }}

    def run(self, text_encoder, prompt, negative_prompt, max_sequence_length):
        get_host().load(text_encoder)
        return (stage.encode_text(text_encoder, prompt, max_sequence_length),
                stage.encode_text(text_encoder, negative_prompt, max_sequence_length))


class LetterpressOvisImageEmptyLatent(EmptyLatentNode):
    DESCRIPTION = "An empty Ovis-Image latent (16 channels at 1/8 size) for text-to-image."
    CATEGORY = CAT
    EMPTY = staticmethod(stage.empty_latent)
    VALIDATE_INPUTS = size_validator(stage.check_size, 16)


class LetterpressOvisImageSampler:
    DESCRIPTION = ("Denoises with the Ovis-Image DiT (flow matching, Euler, FLUX's resolution-dependent shift). "
                   "Model card: 50 steps, CFG 5.0 with an empty negative prompt. CFG 1 skips the negative pass.")
    CATEGORY = CAT
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "The Ovis-Image DiT from a loader (or a LoRA / Torch Compile node)."}),
                "positive": (COND, {"tooltip": "The positive output of Ovis-Image Text Encode."}),
                "latent": ("LATENT", {"tooltip": "Ovis-Image Empty Latent, or VAE Encode for image-to-image."}),
                "seed": seed_input(),
                "steps": steps_input(50, "50 in the model card."),
                "cfg": cfg_input(5.0, "5.0 in the model card; 1.0 skips the negative pass."),
                "denoise": denoise_input(),
            },
            "optional": {"negative": (COND, {"tooltip": "Needed when cfg > 1: the negative output of Text Encode."})},
        }

    def run(self, dit, positive, latent, seed, steps, cfg, denoise, negative=None):
        get_host().load(dit, memory_required=stage.memory_required(dit, positive, negative, latent, cfg))
        return (stage.sample(dit, positive, negative, latent, seed, steps, cfg, denoise),)


class LetterpressOvisImageVAEDecode(VAEDecodeNode):
    DESCRIPTION = "Decodes Ovis-Image latents to an IMAGE with the FLUX.1 VAE."
    CATEGORY = CAT
    VAE_TYPE = VAE
    DECODE = staticmethod(stage.decode)


class LetterpressOvisImageVAEEncode(VAEEncodeNode):
    DESCRIPTION = "Encodes an IMAGE into Ovis-Image latents with the FLUX.1 VAE, for image-to-image with denoise below 1."
    CATEGORY = CAT
    VAE_TYPE = VAE
    ENCODE = staticmethod(stage.encode)


LetterpressOvisImageLoraLoader = lora_loader("LetterpressOvisImageLoraLoader", "Ovis-Image", DIT)
LetterpressOvisImageCompile = compile_node("LetterpressOvisImageCompile", "Ovis-Image", DIT)
def _training_preview(te, vae, prompt, size, seed):
    """Train LoRA's samples: the prompt and the empty negative encoded once; each sample at CFG 5."""
    pos, neg = LetterpressOvisImageTextEncode().run(te, prompt, "", stage.MAX_SEQUENCE_LENGTH)
    latent = LetterpressOvisImageEmptyLatent().run(size, size, 1)[0]

    def draw(dit, steps):
        out = LetterpressOvisImageSampler().run(dit, pos, latent, seed, steps, 5.0, 1.0, neg)[0]
        return LetterpressOvisImageVAEDecode().run(vae, out)[0]

    return draw


LetterpressOvisImageTrainLoRA = train_lora_node(
    "LetterpressOvisImageTrainLoRA", "Ovis-Image",
    "Trains a LoRA on the Ovis-Image DiT from a dataset of images and captions: flow matching on the sampler's "
    "schedule at 1000 steps (FLUX's dynamic shift at each bucket's size), timesteps drawn uniformly, AdamW. Latents and "
    "text encodings are computed once, then the DiT trains with the text encoder and VAE left for the memory manager "
    "to unload. Works on bf16, fp8 and quantized (GGUF) DiTs. Cancel stops within one step and writes the LoRA of the "
    "steps done to output/loras.",
    {"dit": (DIT, "The Ovis-Image DiT to train on (a LoRA chained before it is kept under it)."),
     "text_encoder": (TE, "The Ovis2.5 text encoder, to encode the captions."),
     "vae": (VAE, "The FLUX.1 VAE, to encode the images.")},
    lambda: {}, stage.encode_dataset, stage.training_family, _training_preview)
LetterpressOvisImageApplyTrainedLoRA = apply_trained_node("LetterpressOvisImageApplyTrainedLoRA", "Ovis-Image", DIT,
                                                          stage.FAMILY)

NODES = {c.__name__: c for c in (
    LetterpressOvisImageTrainLoRA, LetterpressOvisImageApplyTrainedLoRA, LetterpressOvisImageLoraLoader, LetterpressOvisImageCompile,
    LetterpressOvisImageFolderLoader, LetterpressOvisImageDiTLoader, LetterpressOvisImageTextEncoderLoader,
    LetterpressOvisImageVAELoader, LetterpressOvisImageTextEncode, LetterpressOvisImageEmptyLatent,
    LetterpressOvisImageSampler, LetterpressOvisImageVAEDecode, LetterpressOvisImageVAEEncode,
)}
DISPLAY_NAMES = {
    "LetterpressOvisImageFolderLoader": "Ovis-Image Folder Loader",
    "LetterpressOvisImageLoraLoader": "Ovis-Image LoRA Loader",
    "LetterpressOvisImageCompile": "Ovis-Image Torch Compile",
    "LetterpressOvisImageDiTLoader": "Ovis-Image DiT Loader",
    "LetterpressOvisImageTextEncoderLoader": "Ovis-Image Text Encoder Loader",
    "LetterpressOvisImageVAELoader": "Ovis-Image VAE Loader",
    "LetterpressOvisImageTextEncode": "Ovis-Image Text Encode",
    "LetterpressOvisImageEmptyLatent": "Ovis-Image Empty Latent",
    "LetterpressOvisImageSampler": "Ovis-Image DiT Sample",
    "LetterpressOvisImageVAEDecode": "Ovis-Image VAE Decode",
    "LetterpressOvisImageVAEEncode": "Ovis-Image VAE Encode",
    "LetterpressOvisImageTrainLoRA": "Ovis-Image Train LoRA",
    "LetterpressOvisImageApplyTrainedLoRA": "Ovis-Image Apply Trained LoRA",
}
