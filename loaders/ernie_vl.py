"""ERNIE-4.5-VL-28B-A3B (-PT and -Thinking) from a transformers checkpoint folder under models/LLM/.

Loading goes through transformers' own `from_pretrained` with the chosen dtype rather than the pack's
meta-device `fill_module`: the Hugging Face checkpoint stores each MoE expert separately and transformers
converts them on load into its fused expert tensors (text and vision experts apart, routers kept in fp32).
Re-implementing that conversion would duplicate transformers; `from_pretrained` already builds on the meta
device and fills from memory-mapped safetensors, so peak memory stays at one copy of the weights.

The processor is transformers' `Ernie4_5_VLMoeProcessor` minus its video processor, which needs torchvision;
images go through `Ernie4_5_VLMoeImageProcessorPil`, which does not. The video processor is read from the folder at
the first video (`video_processor`): its settings (processor_config.json) and the font it draws each frame's time with.
"""

from __future__ import annotations

import glob
import json
import os

from . import ernie_vl_experts
from . import quantize
from .errors import LetterpressError
from .explain import Source
from .families import FamilySpec, TextReader
from .files import PICKLE_EXTENSIONS, list_subfolders
from .handle import ModelHandle
from .host import get_host
from .llm import read_tokenizer
from .stage import choose_layers
from .storage import Storage
from .weights import read_json

FAMILY = "ernie_vl"
MODEL_TYPE = "ernie4_5_vl_moe"
REMOTE_CODE_TYPES = ("ernie4_5_moe_vl",)  # the original release, which needs trust_remote_code

SPEC = FamilySpec(
    key=FAMILY, title="ERNIE-4.5-VL", class_stem="ErnieVL",
    sources=(Source("ERNIE-4.5-VL", FAMILY, "folder", "LLM", "ERNIE-4.5-VL-28B-A3B-PT", "baidu/ERNIE-4.5-VL-28B-A3B-PT",
                    model_type=MODEL_TYPE),
             Source("ERNIE-4.5-VL Thinking", FAMILY, "folder", "LLM", "ERNIE-4.5-VL-28B-A3B-Thinking",
                    "baidu/ERNIE-4.5-VL-28B-A3B-Thinking", model_type=MODEL_TYPE)),
    text_reader=TextReader(io_type="LP_ERNIE_VL"),  # Read Text's vl_model input
)
# Token strings of the real tokenizer, used when a tokenizer does not name them itself.
DEFAULT_TOKENS = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>",
                  "image_end_token": "<|IMAGE_END|>", "video_token": "<|VIDEO_PLACEHOLDER|>",
                  "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}


def list_folders() -> list[str]:
    """Folders under models/LLM whose config.json is an ERNIE-4.5-VL model."""
    found = []
    for name in list_subfolders("LLM"):
        for base in get_host().model_folders("LLM"):
            path = os.path.join(base, name, "config.json")
            if os.path.exists(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        kind = json.load(f).get("model_type", "")
                except (OSError, ValueError):
                    kind = ""
                if kind == MODEL_TYPE or kind in REMOTE_CODE_TYPES:
                    found.append(name)
                break
    return found


def _token_attributes(processor, tokenizer) -> None:
    """The image/video marker tokens and ids transformers' processor reads from the tokenizer (the real ones where a
    tokenizer does not name them itself)."""
    for attr, default in DEFAULT_TOKENS.items():
        token = getattr(tokenizer, attr, None) or default
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise LetterpressError(
                f"ERNIE-4.5-VL: the tokenizer has no '{token}' token. The folder's tokenizer is not the "
                "ERNIE-4.5-VL one; download the model folder again."
            )
        setattr(processor, attr, token)
        setattr(processor, attr + "_id", token_id)


def _processor_class():
    from transformers import Ernie4_5_VLMoeProcessor
    from transformers.processing_utils import ProcessorMixin

    class ErnieVLImageProcessor(Ernie4_5_VLMoeProcessor):
        """transformers' ERNIE-4.5-VL processor for images only (token expansion, M-RoPE and MoE type ids)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            _token_attributes(self, tokenizer)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ErnieVLImageProcessor


def _video_processor_class():
    from transformers import Ernie4_5_VLMoeProcessor
    from transformers.processing_utils import ProcessorMixin

    class ErnieVLVideoProcessor(Ernie4_5_VLMoeProcessor):
        """transformers' ERNIE-4.5-VL processor with its video processor (frames: needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
            _token_attributes(self, tokenizer)
            ProcessorMixin.__init__(self, image_processor, tokenizer, video_processor, chat_template=chat_template)

    return ErnieVLVideoProcessor


def _chat_template(folder: str, tokenizer) -> str:
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            tmpl = read_json(p, "ERNIE-4.5-VL processor").get("chat_template")
            if tmpl:
                return tmpl
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise LetterpressError(f"ERNIE-4.5-VL: {folder} has no chat template (chat_template.jinja). Download the folder again.")


def _nested_image_processor(folder: str, cls):
    """The image processor a processor_config.json holds (the PIL twin of the class it names, which needs no
    torchvision: the same settings give the same pixels)."""
    path = os.path.join(folder, "processor_config.json")
    nested = read_json(path, "ERNIE-4.5-VL processor").get("image_processor") if os.path.exists(path) else None
    if not isinstance(nested, dict):
        raise LetterpressError(f"ERNIE-4.5-VL: {folder} has no image processor (neither preprocessor_config.json nor "
                               "an image_processor entry in processor_config.json). Download the whole model folder.")
    try:
        return cls.from_dict({k: v for k, v in nested.items() if k != "image_processor_type"})
    except (TypeError, ValueError) as e:
        raise LetterpressError(f"ERNIE-4.5-VL: the image_processor in {path} cannot be read ({e}). "
                               "Download the file again.") from None


def load_processor(folder: str):
    from transformers import AutoTokenizer, Ernie4_5_VLMoeImageProcessorPil

    tokenizer = read_tokenizer(AutoTokenizer.from_pretrained, folder, "ERNIE-4.5-VL")
    if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        image_processor = read_tokenizer(Ernie4_5_VLMoeImageProcessorPil.from_pretrained, folder, "ERNIE-4.5-VL",
                                         ("preprocessor_config.json",), "image processor")
    else:  # as Ernie4_5_VLMoeProcessor.save_pretrained (transformers 5) writes it: inside processor_config.json
        image_processor = _nested_image_processor(folder, Ernie4_5_VLMoeImageProcessorPil)
    return _processor_class()(image_processor, tokenizer, chat_template=_chat_template(folder, tokenizer))


def load(folder: str, storage: Storage, experts: str = "auto") -> ModelHandle:
    """The model, its processor and chat template, wrapped for the host's memory manager; `experts` (one of
    ernie_vl_experts.CHOICES) keeps the routed experts in CPU memory, out of the memory manager's reach."""
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    cfg = read_json(os.path.join(folder, "config.json"), "ERNIE-4.5-VL")
    kind = cfg.get("model_type", "")
    if kind in REMOTE_CODE_TYPES:
        raise LetterpressError(
            f"ERNIE-4.5-VL: {folder} holds the original release (model_type '{kind}'), which needs remote code. "
            f"Letterpress loads the transformers-native layout (model_type '{MODEL_TYPE}'); download that revision."
        )
    if kind != MODEL_TYPE:
        raise LetterpressError(f"ERNIE-4.5-VL: {folder} is a '{kind or 'unknown'}' model, not ERNIE-4.5-VL.")
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        pickles = [f for f in os.listdir(folder) if f.endswith(PICKLE_EXTENSIONS)]
        hint = " It only holds pickle files, which Letterpress does not load." if pickles else ""
        raise LetterpressError(f"ERNIE-4.5-VL: {folder} holds no .safetensors weights.{hint}")
    processor = load_processor(folder)
    dtype = storage.dtype
    if storage.linear is not None:  # fp8
        raise LetterpressError(f"ERNIE-4.5-VL: {storage.choice} weight storage is offered for the image DiTs only; "
                               "load this model as auto, bf16, fp16 or fp32.")
    try:
        model_cls = get_host().model_class(Ernie4_5_VLMoeForConditionalGeneration)
        model = model_cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise LetterpressError(f"ERNIE-4.5-VL: the weights in {folder} could not be loaded ({e}).")
    # transformers built it with torch's layers: rebuild them as the host's (their tensors pass through each new
    # layer's loading path), as the meta-device loaders choose them before filling
    qtype = storage.quant
    choose_layers(model, storage)
    if qtype is not None:
        quantize.pack_loaded(model, qtype)  # Q8_0 ...: the Linear layers packed
    offload = ernie_vl_experts.wanted(experts, model, get_host().compute_device(), qtype)
    ernie_vl_experts.replace_banks(model, offload, qtype)  # the routed experts in CPU memory and/or packed
    model.eval()
    model.requires_grad_(False)
    handle = ModelHandle(family=FAMILY, role="vl_model", module=model, tokenizer=processor.tokenizer, source=folder,
                         extras={"processor": processor, "dtype": str(dtype).replace("torch.", "")})
    return handle


def video_processor_class():
    """transformers' ERNIE-4.5-VL video processor class (its module imports torchvision)."""
    try:
        from transformers import Ernie4_5_VLMoeVideoProcessor
    except ImportError as e:
        raise LetterpressError(f"ERNIE-4.5-VL video needs torchvision, which is not installed ({e}). ComfyUI ships it; "
                               "elsewhere: pip install torchvision (the build for the installed torch).") from None
    return Ernie4_5_VLMoeVideoProcessor


def video_processor(handle: ModelHandle):
    """The processor for images and video of a loaded model: transformers' `Ernie4_5_VLMoeVideoProcessor` as the
    folder configures it (processor_config.json's video_processor, or video_preprocessor_config.json; transformers'
    defaults, which are the original release's, where the folder has neither) with the font it draws each frame's
    time with. Read once per model."""
    cached = handle.extras.get("video_processor")
    if cached is not None:
        return cached
    cls = video_processor_class()
    folder = handle.source
    nested = os.path.join(folder, "processor_config.json")
    own = os.path.join(folder, "video_preprocessor_config.json")
    settings = read_json(own, "ERNIE-4.5-VL video processor") if os.path.exists(own) else (
        read_json(nested, "ERNIE-4.5-VL processor").get("video_processor") if os.path.exists(nested) else None)
    settings = settings if isinstance(settings, dict) else None
    draws = (settings or {}).get("draw_on_frames", cls.draw_on_frames)
    font = os.path.join(folder, os.path.basename(str((settings or {}).get("font") or cls.font)))
    if draws and not os.path.isfile(font):
        raise LetterpressError(
            f"ERNIE-4.5-VL draws each video frame's time on it (as the model was trained) with the font "
            f"{os.path.basename(font)}, which is not in {folder}: download it from the model repository into that "
            "folder.")
    try:
        video = cls.from_pretrained(folder, local_files_only=True) if settings is not None else cls()
    except (OSError, AttributeError, ValueError, TypeError) as e:
        raise LetterpressError(f"ERNIE-4.5-VL: the video processor settings in {folder} cannot be read ({e}). "
                               "Download processor_config.json from the model repository again.") from None
    if draws:
        video.font = font
    base = handle.extras["processor"]
    processor = _video_processor_class()(base.image_processor, base.tokenizer, video,
                                         chat_template=base.chat_template)
    handle.extras["video_processor"] = processor
    return processor
