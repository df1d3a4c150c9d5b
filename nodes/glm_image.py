"""GLM-Image nodes: AR prior tokens, glyph encoding, DiT sampling and VAE, thin over loaders/ and samplers/."""

from __future__ import annotations

from ..loaders import glm_image as load
from ..loaders.errors import LetterpressError
from ..loaders.files import resolve
from ..loaders.host import get_host
from ..samplers import glm_image as stage
from ..samplers.images import check_image
from .common import (
    CATEGORY,
    VAEDecodeNode,
    cfg_input,
    dtype_input,
    folder_input,
    folder_validator,
    hosted,
    seed_input,
    size_input,
    size_validator,
    steps_input,
    weight_storage,
)
from .dit_options import compile_node, lora_loader
from .training import apply_trained_node, train_lora_node

CAT = f"{CATEGORY}/GLM-Image"
AR, GLYPH, DIT, VAE, PRIOR = "LP_GLM_AR", "LP_GLM_GLYPH_ENCODER", "LP_GLM_DIT", "LP_GLM_VAE", "LP_GLM_PRIOR"
COND = "LP_CONDITIONING"
MAX_REFERENCES = 4


def _folder():
    return folder_input(load.PIPELINE_CLASSES, "The GLM-Image folder (zai-org/GLM-Image) under models/diffusers.")


class _ComponentLoader:
    CATEGORY = CAT
    FUNCTION = "run"
    LOAD = None
    FAMILY, PARTS = load.FAMILY, ()  # the subfolders its loader reads (what --download fetches)
    VALIDATE_INPUTS = folder_validator(load.FAMILY, "this GLM-Image loader")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": _folder(), "weight_dtype": dtype_input()}}

    def run(self, folder, weight_dtype):
        storage = weight_storage(weight_dtype)
        return hosted(type(self).LOAD(resolve("diffusers", folder), storage))


class LetterpressGlmImageARLoader(_ComponentLoader):
    DESCRIPTION = ("Loads GLM-Image's AR model (vision-language encoder, ~10B: LM, ViT and VQ tokenizer) with its "
                   "processor, from the GLM-Image folder's vision_language_encoder/ and processor/.")
    RETURN_TYPES = (AR,)
    RETURN_NAMES = ("ar_model",)
    PARTS = ("vision_language_encoder", "processor")
    LOAD = staticmethod(load.load_ar)


class LetterpressGlmImageGlyphEncoderLoader(_ComponentLoader):
    DESCRIPTION = "Loads the ByT5 glyph encoder (text_encoder/ + tokenizer/) that encodes the quoted text to render."
    RETURN_TYPES = (GLYPH,)
    RETURN_NAMES = ("glyph_encoder",)
    PARTS = ("text_encoder", "tokenizer")
    LOAD = staticmethod(load.load_glyph_encoder)


class LetterpressGlmImageDiTLoader(_ComponentLoader):
    DESCRIPTION = "Loads the GLM-Image DiT (transformer/, ~7B) and its scheduler settings (scheduler/)."
    RETURN_TYPES = (DIT,)
    RETURN_NAMES = ("dit",)
    PARTS = ("transformer", "scheduler")
    LOAD = staticmethod(load.load_dit)


class LetterpressGlmImageVAELoader(_ComponentLoader):
    DESCRIPTION = "Loads GLM-Image's 16-channel KL VAE (vae/, with its latents mean and std)."
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    PARTS = ("vae",)
    LOAD = staticmethod(load.load_kl_vae)


class LetterpressGlmImageFolderLoader:
    DESCRIPTION = ("Loads every GLM-Image stage from the Hugging Face folder zai-org/GLM-Image placed in "
                   "models/diffusers/GLM-Image: AR model + processor, ByT5 glyph encoder, DiT, VAE.")
    CATEGORY = CAT
    RETURN_TYPES = (AR, GLYPH, DIT, VAE)
    RETURN_NAMES = ("ar_model", "glyph_encoder", "dit", "vae")
    FUNCTION = "run"
    FAMILY, PARTS = load.FAMILY, ("vision_language_encoder", "processor", "text_encoder", "tokenizer", "transformer",
                                  "scheduler", "vae")
    VALIDATE_INPUTS = folder_validator(load.FAMILY, "the GLM-Image Folder Loader",
                                       tuple(p for p in PARTS if p != "scheduler"))  # without it: the defaults

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": _folder(), "weight_dtype": dtype_input()}}

    def run(self, folder, weight_dtype):
        storage = weight_storage(weight_dtype)
        m = load.load_folder(resolve("diffusers", folder), storage)
        return hosted(m["ar"], m["glyph_encoder"], m["dit"], m["vae"])


class LetterpressGlmImageARTokens:
    DESCRIPTION = ("Runs the AR model: the prompt (and any reference images) -> the prior image tokens the DiT "
                   "paints from. Text-to-image generates a small preview grid first, then the d32 grid; editing "
                   "generates the d32 grid only. One progress tick per token; Cancel stops within one token. "
                   "Reference images are resized to the size the processor keeps (even multiples of its patch).")
    CATEGORY = CAT
    RETURN_TYPES = (PRIOR, "STRING")
    RETURN_NAMES = ("prior", "prompt")
    OUTPUT_TOOLTIPS = ("The prior tokens for DiT Sample.", "The prompt, to wire into Glyph Encode so both use the same text.")
    FUNCTION = "run"
    VALIDATE_INPUTS = size_validator(stage.check_size, 32)

    @classmethod
    def INPUT_TYPES(cls):
        refs = {f"reference_{i}": ("IMAGE", {"tooltip": "A reference image (editing, style, identity, multi-subject). "
                                                         "Every frame of a batch counts as one reference, in order."})
                for i in range(1, MAX_REFERENCES + 1)}
        return {
            "required": {
                "ar_model": (AR, {"tooltip": "The AR generator from a GLM-Image loader."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                      "tooltip": "Put text to render in quotes: 'like this', \"this\", “this” or 「this」."}),
                "width": size_input(1024, 32, "Output width"),
                "height": size_input(1024, 32, "Output height"),
                "seed": ("INT", {**seed_input()[1], "tooltip": "AR sampling seed. The reference pipeline uses one seed "
                                 "for the AR stage and the DiT noise: give DiT Sample the same seed to reproduce it."}),
                "temperature": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "Sampling temperature (model card: 0.9). 0 = greedy."}),
                "top_p": ("FLOAT", {"default": 0.75, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "Nucleus sampling (model card: 0.75)."}),
            },
            "optional": refs,
        }

    def run(self, ar_model, prompt, width, height, seed, temperature, top_p, **references):
        stage.check_size(width, height)
        images = []
        for i in range(1, MAX_REFERENCES + 1):
            batch = references.get(f"reference_{i}")
            if batch is not None:
                batch = check_image(batch, f"GLM-Image AR Tokens reference_{i}")
                images.extend(batch[j] for j in range(batch.shape[0]))
        if len(images) > MAX_REFERENCES:
            raise LetterpressError(
                f"GLM-Image AR Tokens takes at most {MAX_REFERENCES} reference images in all, got {len(images)} "
                "(a batch counts one per frame). Pass fewer images, or split the batch."
            )
        get_host().load(ar_model)
        return (stage.ar_tokens(ar_model, prompt, width, height, seed, temperature, top_p, images), prompt)


class LetterpressGlmImagePriorPreview:
    DESCRIPTION = "Shows the AR prior tokens as an image: one flat colour per codebook entry, one cell per d32 token."
    CATEGORY = CAT
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "summary")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prior": (PRIOR, {"tooltip": "The prior from GLM-Image AR Tokens."})}}

    def run(self, prior):
        prior = stage.check_prior(prior)
        gh, gw = prior.grid
        summary = (f"{prior.width}x{prior.height}: {gh}x{gw} d32 tokens ({prior.generated.numel()} generated), "
                   f"{len(prior.reference_tokens)} reference image(s), {len(set(prior.tokens.flatten().tolist()))} distinct codes")
        return (stage.prior_preview(prior), summary)


class LetterpressGlmImageGlyphEncode:
    DESCRIPTION = ("Finds the quoted text in the prompt exactly as the reference does ('..', “..”, \"..\", 「..」) and "
                   "encodes it with ByT5. Also returns the spans found, one per line, so you see what will be "
                   "rendered. No quoted text encodes an empty string; encode an empty prompt for the negative.")
    CATEGORY = CAT
    RETURN_TYPES = (COND, "STRING")
    RETURN_NAMES = ("conditioning", "glyph_text")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "glyph_encoder": (GLYPH, {"tooltip": "The ByT5 glyph encoder from a GLM-Image loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                  "tooltip": "The same prompt as AR Tokens; only its quoted spans are encoded."}),
        }}

    def run(self, glyph_encoder, prompt):
        get_host().load(glyph_encoder)
        cond = stage.encode_glyphs(glyph_encoder, prompt)
        return (cond, "\n".join(cond.extras["spans"]))


class LetterpressGlmImageSampler:
    DESCRIPTION = ("Paints the image with the GLM-Image DiT from the AR prior tokens and the glyph conditioning "
                   "(flow matching, Euler, the reference's dynamic shift). CFG runs a second pass without the "
                   "prior tokens, with the negative glyphs. For editing, wire the references' latents: they fill "
                   "the DiT's KV cache at t=0 as the reference does. Size comes from the prior.")
    CATEGORY = CAT
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": (DIT, {"tooltip": "The GLM-Image DiT from a loader (or a LoRA / Torch Compile node)."}),
                "prior": (PRIOR, {"tooltip": "The prior tokens from GLM-Image AR Tokens."}),
                "positive": (COND, {"tooltip": "GLM-Image Glyph Encode of the prompt."}),
                "seed": seed_input(),
                "steps": steps_input(50, "Reference: 50 (SGLang uses 30)."),
                "cfg": cfg_input(1.5, "Reference: 1.5. 1.0 skips the unconditional pass."),
            },
            "optional": {
                "negative": (COND, {"tooltip": "Glyph Encode of an empty prompt (the reference's negative); needed when cfg > 1."}),
                "reference_latents": ("LATENT", {"tooltip": "GLM-Image VAE Encode of the prior's reference images (editing)."}),
            },
        }

    def run(self, dit, prior, positive, seed, steps, cfg, negative=None, reference_latents=None):
        get_host().load(dit, memory_required=stage.memory_required(dit, prior, positive))
        return (stage.sample(dit, prior, positive, negative, seed, steps, cfg, reference_latents),)


class LetterpressGlmImageVAEDecode(VAEDecodeNode):
    DESCRIPTION = "Decodes GLM-Image latents to an IMAGE with its 16-channel VAE."
    CATEGORY = CAT
    VAE_TYPE = VAE
    DECODE = staticmethod(stage.decode)


class LetterpressGlmImageVAEEncode:
    DESCRIPTION = ("Encodes images into GLM-Image latents. For editing, wire the prior from AR Tokens: its reference "
                   "images are encoded at the size the AR model saw them, one latent each, for DiT Sample.")
    CATEGORY = CAT
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "The GLM-Image VAE from a loader."})},
                "optional": {"prior": (PRIOR, {"tooltip": "Encode this prior's reference images (editing)."}),
                             "image": ("IMAGE", {"tooltip": "Or encode this image (sizes multiples of 16)."})}}

    def run(self, vae, prior=None, image=None):
        get_host().load(vae)
        return (stage.encode(vae, image, prior),)


LetterpressGlmImageLoraLoader = lora_loader("LetterpressGlmImageLoraLoader", "GLM-Image", DIT)
LetterpressGlmImageCompile = compile_node("LetterpressGlmImageCompile", "GLM-Image", DIT)
def _training_preview(ar, glyph, vae, prompt, size, seed):
    """Train LoRA's samples: the AR model's prior tokens for the prompt and its glyphs, made once (the AR model is
    not run again during training); each sample at CFG 1.5 against the empty prompt's glyphs."""
    prior = LetterpressGlmImageARTokens().run(ar, prompt, size, size, seed, 0.9, 0.75)[0]
    positive = LetterpressGlmImageGlyphEncode().run(glyph, prompt)[0]
    negative = LetterpressGlmImageGlyphEncode().run(glyph, "")[0]

    def draw(dit, steps):
        out = LetterpressGlmImageSampler().run(dit, prior, positive, seed, steps, 1.5, negative)[0]
        return LetterpressGlmImageVAEDecode().run(vae, out)[0]

    return draw


LetterpressGlmImageTrainLoRA = train_lora_node(
    "LetterpressGlmImageTrainLoRA", "GLM-Image",
    "Trains a LoRA on the GLM-Image DiT from a dataset of images and captions: flow matching on the sampler's schedule "
    "at 1000 steps, each image conditioned on its own AR prior tokens (the AR model's vision tokens of the image) and "
    "its caption's quoted-text glyphs; AdamW. The AR model is used once, to tokenize the images; latents, tokens and "
    "glyph encodings are computed once, then the DiT trains with the others left for the memory manager to unload. "
    "Cancel stops within one step and writes the LoRA of the steps done to output/loras.",
    {"dit": (DIT, "The GLM-Image DiT to train on (a LoRA chained before it is kept under it)."),
     "ar_model": (AR, "The GLM-Image AR model, to tokenize the training images into prior tokens."),
     "glyph_encoder": (GLYPH, "The ByT5 glyph encoder, to encode the captions' quoted text."),
     "vae": (VAE, "The GLM-Image VAE, to encode the images.")},
    lambda: {}, stage.encode_dataset, stage.training_family, _training_preview)
LetterpressGlmImageApplyTrainedLoRA = apply_trained_node("LetterpressGlmImageApplyTrainedLoRA", "GLM-Image", DIT,
                                                         stage.FAMILY)

NODES = {c.__name__: c for c in (
    LetterpressGlmImageTrainLoRA, LetterpressGlmImageApplyTrainedLoRA, LetterpressGlmImageLoraLoader, LetterpressGlmImageCompile,
    LetterpressGlmImageFolderLoader, LetterpressGlmImageARLoader, LetterpressGlmImageGlyphEncoderLoader,
    LetterpressGlmImageDiTLoader, LetterpressGlmImageVAELoader, LetterpressGlmImageARTokens,
    LetterpressGlmImagePriorPreview, LetterpressGlmImageGlyphEncode, LetterpressGlmImageSampler,
    LetterpressGlmImageVAEDecode, LetterpressGlmImageVAEEncode,
)}
DISPLAY_NAMES = {
    "LetterpressGlmImageFolderLoader": "GLM-Image Folder Loader",
    "LetterpressGlmImageLoraLoader": "GLM-Image LoRA Loader",
    "LetterpressGlmImageCompile": "GLM-Image Torch Compile",
    "LetterpressGlmImageARLoader": "GLM-Image AR Loader",
    "LetterpressGlmImageGlyphEncoderLoader": "GLM-Image Glyph Encoder Loader",
    "LetterpressGlmImageDiTLoader": "GLM-Image DiT Loader",
    "LetterpressGlmImageVAELoader": "GLM-Image VAE Loader",
    "LetterpressGlmImageARTokens": "GLM-Image AR Tokens",
    "LetterpressGlmImagePriorPreview": "GLM-Image Prior Preview",
    "LetterpressGlmImageGlyphEncode": "GLM-Image Glyph Encode",
    "LetterpressGlmImageSampler": "GLM-Image DiT Sample",
    "LetterpressGlmImageVAEDecode": "GLM-Image VAE Decode",
    "LetterpressGlmImageVAEEncode": "GLM-Image VAE Encode",
    "LetterpressGlmImageTrainLoRA": "GLM-Image Train LoRA",
    "LetterpressGlmImageApplyTrainedLoRA": "GLM-Image Apply Trained LoRA",
}

from . import glm_image_remote  # noqa: E402  (the Remote node: GLM-Image on a vLLM-Omni server)

NODES.update(glm_image_remote.NODES)
DISPLAY_NAMES.update(glm_image_remote.DISPLAY_NAMES)
