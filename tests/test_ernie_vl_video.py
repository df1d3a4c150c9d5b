"""ERNIE-4.5-VL video: the pack's prompt inputs and greedy tokens against transformers' own processor (loaded by
AutoProcessor from the folder: its video processor, font and chat template) and generate() on the same frames; the
ERNIE-VL Video node from frames or from a ComfyUI VIDEO; the sampling rule; clear errors."""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

QUESTION = "describe this image"
PT = "ERNIE-4.5-VL-28B-A3B-PT"


def node(name):
    return N["LetterpressErnieVL" + name]()


def frames(seed, n, size=(80, 64)):
    """(n, H, W, 3) uint8 frames: the reference's input; the pack gets them as a ComfyUI IMAGE (floats 0..1)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)


def as_image(arr):
    return torch.from_numpy(arr.astype(np.float32) / 255.0)


def clip(arr, fps, sample_fps=2.0):
    return node("Video").run(sample_fps, frames=as_image(arr), frame_rate=fps)[0]


@pytest.fixture(scope="module")
def vl(ernie_vl):
    return node("Loader").run(PT, "auto")[0]


@pytest.fixture(scope="module")
def reference(ernie_vl):
    from transformers import AutoProcessor, Ernie4_5_VLMoeForConditionalGeneration, Ernie4_5_VLMoeImageProcessorPil

    folder = ernie_vl["folder"]
    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    # pictures through the PIL image processor, as the pack (and test_ernie_vl.py's reference) takes them: its
    # torchvision twin resizes a few pixel values differently
    pictures = Ernie4_5_VLMoeImageProcessorPil.from_pretrained(folder)
    return model, AutoProcessor.from_pretrained(folder, image_processor=pictures)


def reference_inputs(reference, video, fps, images=(), sample_fps=2.0):
    """transformers alone: its processor (sampling at `sample_fps` as the original did; transformers' own rule
    without it), the chat template's text for the pictures, then the video, then the question."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    _, processor = reference
    content = [{"type": "image"}] * len(images) + [{"type": "video"}, {"type": "text", "text": QUESTION}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)
    kwargs = {"fps": sample_fps} if sample_fps else {}
    return processor(text=[text], images=[Image.fromarray(i) for i in images] or None, videos=[video],
                     video_metadata=[VideoMetadata(total_num_frames=len(video), fps=fps)], return_tensors="pt", **kwargs)


def reference_ids(reference, inputs, tokens):
    with torch.no_grad():
        out = reference[0].generate(**inputs, max_new_tokens=tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[:-1] if ids and ids[-1] == reference[1].tokenizer.eos_token_id else ids


def words(tok, ids):
    """The answer text of these ids: the WordLevel tokenizer joins tokens with single spaces, so equal text is equal
    tokens; framing tokens (BOS/EOS/pad, image and video markers, think tags) are not part of an answer."""
    framing = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *tok.convert_tokens_to_ids(["<think>", "</think>"])}
    framing |= {getattr(tok, f"{kind}_{part}token_id") for kind in ("image", "video") for part in ("", "start_", "end_")}
    kept = [i for i in ids if i not in framing]
    assert len(kept) >= 8, "the reference must be comparable word for word"
    return " ".join(tok.convert_ids_to_tokens(kept))


def pack_inputs(vl, video_clip, images=None):
    from letterpress.samplers import ernie_vl

    pil = [] if images is None else ernie_vl.to_pil(as_image(np.stack(images)))
    return ernie_vl.prepare_inputs(vl, pil, QUESTION, "", False, video_clip)


def ask(vl, video_clip, images=None, tokens=16):
    imgs = None if images is None else as_image(np.stack(images))
    return node("Generate").run(vl, imgs, "free question", QUESTION, "", False, tokens, 0.0, 0.8, 0, video=video_clip)


@pytest.mark.parametrize("n,fps,sample_fps,expected_frames", [
    (30, 10.0, 2.0, 6),   # 3 s at 2 frames per second
    (20, 30.0, 2.0, 4),   # 0.67 s: the folder's minimum of 4 frames (16 in the real model)
    (30, 10.0, 0.0, 12),  # transformers' own rule: every frame up to the folder's maximum of 12 (180 real)
    (3, 10.0, 2.0, 4),    # fewer frames than the minimum: all 3, the odd last one repeated (temporal patch 2)
])
def test_video_inputs_and_tokens_equal_transformers(vl, reference, n, fps, sample_fps, expected_frames):
    video = frames(n, n)
    ours = pack_inputs(vl, clip(video, fps, sample_fps))
    ref = reference_inputs(reference, video, fps, sample_fps=sample_fps)
    assert set(ours) == set(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    assert ours["video_grid_thw"][0, 0].item() == expected_frames
    tok = reference[1].tokenizer
    body = reference_ids(reference, ref, 16)
    assert ask(vl, clip(video, fps, sample_fps)) == (words(tok, body), "")


def test_pictures_then_video_equal_transformers(vl, reference):
    video, pictures = frames(7, 30), list(frames(8, 2, size=(64, 56)))
    ours = pack_inputs(vl, clip(video, 10.0), pictures)
    ref = reference_inputs(reference, video, 10.0, images=pictures)
    assert set(ours) == set(ref) and {"pixel_values", "pixel_values_videos"} <= set(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    body = reference_ids(reference, ref, 16)
    assert ask(vl, clip(video, 10.0), pictures) == (words(reference[1].tokenizer, body), "")


def test_the_model_sees_the_frames_and_their_times(vl):
    """Guards for the parity figures: other frames give another answer, and so does the same clip at another frame
    rate (other frames picked, other times drawn); the times are drawn (pixels differ from undrawn frames)."""
    video = frames(3, 30)
    a, b, c = ask(vl, clip(video, 10.0))[0], ask(vl, clip(frames(4, 30), 10.0))[0], ask(vl, clip(video, 5.0))[0]
    assert len({a, b, c}) == 3, (a, b, c)
    drawn = pack_inputs(vl, clip(video, 10.0))["pixel_values_videos"]
    processor = vl.extras["video_processor"].video_processor
    try:
        processor.draw_on_frames = False
        plain = pack_inputs(vl, clip(video, 10.0))["pixel_values_videos"]
    finally:
        processor.draw_on_frames = True
    assert drawn.shape == plain.shape and not torch.equal(drawn, plain)


def test_a_comfyui_video_gives_the_same_answer_as_its_frames(vl):
    """ComfyUI's VIDEO is read through get_components() (images, frame_rate as a Fraction), as every release has it."""
    video = frames(5, 30)
    comfy_video = SimpleNamespace(get_components=lambda: SimpleNamespace(
        images=as_image(video), frame_rate=Fraction(10), audio=None, metadata=None))
    from_file = node("Video").run(2.0, video_file=comfy_video)[0]
    assert ask(vl, from_file) == ask(vl, clip(video, 10.0))


def test_video_errors(vl, ernie_vl, tmp_path, host):
    video = as_image(frames(0, 4))
    with pytest.raises(LetterpressError, match="either frames .* or a video"):
        node("Video").run(2.0)
    with pytest.raises(LetterpressError, match="not both or neither"):
        node("Video").run(2.0, frames=video, video_file=object())
    with pytest.raises(LetterpressError, match="not a ComfyUI VIDEO"):
        node("Video").run(2.0, video_file=object())
    with pytest.raises(LetterpressError, match="frame rate must be a positive"):
        node("Video").run(2.0, frames=video, frame_rate=0.0)
    with pytest.raises(LetterpressError, match="no frames"):
        node("Video").run(2.0, frames=video[:0], frame_rate=10.0)
    with pytest.raises(LetterpressError, match="No image is wired"):
        node("Generate").run(vl, None, "free question", QUESTION, "", False, 4, 0.0, 0.8, 0)
    # a folder without the font its video processor draws the times with: a clear error naming the file
    folder = tmp_path / "LLM" / "NoFont"
    shutil.copytree(ernie_vl["folder"], folder)
    os.remove(folder / "font.ttf")
    host.models_dir = str(tmp_path)
    model = node("Loader").run("NoFont", "auto")[0]
    with pytest.raises(LetterpressError, match=r"font font.ttf, which is not in .*NoFont"):
        ask(model, clip(frames(0, 4), 10.0), tokens=2)
