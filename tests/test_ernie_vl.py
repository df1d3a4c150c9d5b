"""ERNIE-4.5-VL: the nodes on a tiny random model against transformers' own generate(), the thinking split on
scripted token sequences, grounding parse/draw, loader errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from letterpress.loaders.errors import Interrupted, LetterpressError

from letterpress.loaders.handle import ModelHandle

from letterpress.loaders.host import get_host
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

from fixtures.ernie_vl import ScriptedModel

QUESTION = "describe this image"
SEEDS = {1: 11, 2: 13}  # image seeds whose reference answers hold no framing token
PT, THINKING = "ERNIE-4.5-VL-28B-A3B-PT", "ERNIE-4.5-VL-28B-A3B-Thinking"


def node(name):
    return N["LetterpressErnieVL" + name]()


def pil_images(seed, n, size=(80, 64)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def as_tensor(images):
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images]))


@pytest.fixture(scope="module")
def vl(ernie_vl):
    return node("Loader").run(PT, "auto")[0]


def ask(model, images, thinking=False, tokens=12, question=QUESTION, temperature=0.0, seed=0):
    return node("Generate").run(model, images, "free question", question, "", thinking, tokens, temperature, 0.8, seed)


# reference: transformers alone, inputs built here without the pack's processor ------------------------------
@pytest.fixture(scope="module")
def reference(ernie_vl):
    from transformers import AutoTokenizer, Ernie4_5_VLMoeForConditionalGeneration, Ernie4_5_VLMoeImageProcessorPil

    folder = ernie_vl["folder"]
    model = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), Ernie4_5_VLMoeImageProcessorPil.from_pretrained(folder)


def reference_ids(reference, images, thinking, tokens):
    model, tok, improc = reference
    msgs = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    pix = improc(images, return_tensors="pt")
    merged = (pix["image_grid_thw"].prod(-1) // 4).tolist()  # merge 2x2 patches per token
    parts = text.split(tok.image_token)
    assert len(parts) == len(images) + 1
    text = parts[0] + "".join(tok.image_token * m + p for m, p in zip(merged, parts[1:]))
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    vision = torch.tensor([tok.image_token_id])
    mm = torch.isin(ids, vision).long()
    moe = torch.isin(ids, torch.tensor([tok.image_token_id, tok.image_start_token_id, tok.image_end_token_id])).long()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=mm, moe_mm_token_type_ids=moe,
                             max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def words(tok, ids):
    """The WordLevel tokenizer joins tokens with single spaces: this string identifies the token sequence."""
    return " ".join(tok.convert_ids_to_tokens(ids))


def test_tiny_model_sees_the_images(vl):
    """Guard for the parity figures: the answer depends on the pixels and on the number of images."""
    a = ask(vl, as_tensor(pil_images(1, 1)))[0]
    b = ask(vl, as_tensor(pil_images(2, 1)))[0]
    c = ask(vl, as_tensor(pil_images(1, 2)))[0]
    assert len({a, b, c}) == 3, (a, b, c)


@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_equals_transformers_generate(vl, reference, n_images):
    images = pil_images(SEEDS[n_images], n_images)
    tok = reference[1]
    ref = reference_ids(reference, images, thinking=False, tokens=16)
    eos = tok.eos_token_id
    body = ref[:-1] if ref and ref[-1] == eos else ref
    framing = {tok.bos_token_id, eos, tok.pad_token_id, *tok.convert_tokens_to_ids(["<think>", "</think>"])}
    framing |= {getattr(tok, f"{kind}_{part}token_id") for kind in ("image", "video") for part in ("", "start_", "end_")}
    assert len(body) >= 8 and not framing & set(body), "the reference must be comparable word for word"
    answer, reasoning = ask(vl, as_tensor(images), tokens=16)
    assert answer == words(tok, body)
    assert reasoning == ""


def test_the_checkpoints_own_stop_tokens_end_the_answer(vl, reference):
    """generation_config.eos_token_id may list several stop tokens; generate() stops at any of them, so must we."""
    images = pil_images(SEEDS[1], 1)
    tok = reference[1]
    full = reference_ids(reference, images, thinking=False, tokens=16)
    stop = full[3]
    assert stop not in full[:3]
    before = (reference[0].generation_config.eos_token_id, vl.module.generation_config.eos_token_id)
    try:
        reference[0].generation_config.eos_token_id = vl.module.generation_config.eos_token_id = [tok.eos_token_id, stop]
        ref = reference_ids(reference, images, thinking=False, tokens=16)
        answer, _ = ask(vl, as_tensor(images), tokens=16)
    finally:
        reference[0].generation_config.eos_token_id, vl.module.generation_config.eos_token_id = before
    assert ref == full[:4] and answer == words(tok, ref)


def test_loader_refuses_fp8_clearly(ernie_vl):
    with pytest.raises(LetterpressError, match="fp8_e4m3fn weight storage is offered for the image DiTs only"):
        node("Loader").run(PT, "fp8_e4m3fn")


def test_thinking_on_matches_transformers_and_goes_to_reasoning(vl, reference):
    images = pil_images(21, 1)
    tok = reference[1]
    ref = reference_ids(reference, images, thinking=True, tokens=10)
    assert tok.convert_tokens_to_ids("</think>") not in ref  # the tiny model never closes its reasoning
    answer, reasoning = ask(vl, as_tensor(images), thinking=True, tokens=10)
    assert answer == ""
    assert reasoning == words(tok, [i for i in ref if i != tok.eos_token_id])
    assert reasoning != ask(vl, as_tensor(images), thinking=False, tokens=10)[0]  # the prompt differs


def test_sampling_is_seeded(vl):
    img = as_tensor(pil_images(3, 1))
    a = ask(vl, img, temperature=1.0, seed=5)
    assert a == ask(vl, img, temperature=1.0, seed=5)
    assert a != ask(vl, img, temperature=1.0, seed=6)


def test_thinking_variant_folder_loads(ernie_vl):
    model = node("Loader").run(THINKING, "fp32")[0]
    assert model.family == "ernie_vl" and model.dtype == torch.float32
    assert ask(model, as_tensor(pil_images(1, 1)))[0]


# scripted sequences -----------------------------------------------------------------------------------------
def scripted(vl, text):
    tok = vl.extras["processor"].tokenizer
    ids = tok.convert_tokens_to_ids(text.split())
    assert tok.unk_token_id not in ids
    return ModelHandle(family="ernie_vl", role="vl_model", module=ScriptedModel(ids), tokenizer=tok, extras=vl.extras)


@pytest.mark.parametrize("script,thinking,answer,reasoning", [
    ("w1 w2 </think> red cat <|end_of_sentence|>", True, "red cat", "w1 w2"),
    ("<think> w1 w2 </think> red cat <|end_of_sentence|>", True, "red cat", "w1 w2"),
    ("red cat <|end_of_sentence|>", False, "red cat", ""),
    ("w1 w2 w3", True, "", "w1 w2 w3"),  # the reasoning ran out of tokens before closing
    ("cat <|LOC_BEGIN|> <|LOC_100|> <|LOC_200|> <|LOC_300|> <|LOC_400|> <|LOC_END|> <|end_of_sentence|>", False,
     "cat <|LOC_BEGIN|> <|LOC_100|> <|LOC_200|> <|LOC_300|> <|LOC_400|> <|LOC_END|>", ""),
])
def test_thinking_split_on_scripted_sequences(vl, script, thinking, answer, reasoning):
    handle = scripted(vl, script)
    assert ask(handle, as_tensor(pil_images(0, 1)), thinking=thinking) == (answer, reasoning)
    tok = handle.tokenizer
    prompt_tail = tok.convert_ids_to_tokens(handle.module.prompts[0][-2:])
    assert prompt_tail == (["Assistant:", "<think>"] if thinking else ["<think>", "</think>"])


def test_progress_per_token_and_cancel_within_one_token(vl, host):
    img = as_tensor(pil_images(4, 1))
    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    answer, _ = ask(vl, img, tokens=5)
    assert ticks[-1][1] == 5 and len(ticks) == len(answer.split()) + (0 if len(answer.split()) == 5 else 1)

    ticks.clear()
    host.progress_listeners.append(lambda done, total: host.request_interrupt() if done == 3 else None)
    with pytest.raises(Interrupted):
        ask(vl, img, tokens=20)
    assert len(ticks) == 3


def test_bad_inputs(vl):
    with pytest.raises(LetterpressError, match="prompt is empty"):
        ask(vl, as_tensor(pil_images(0, 1)), question="  ")
    with pytest.raises(LetterpressError, match="No image"):
        ask(vl, torch.zeros(0, 8, 8, 3))


def test_presets_reach_the_model(vl):
    """A preset sends its instruction as the user text; the prompt input adds to it."""
    from letterpress.samplers.ernie_vl import PRESETS

    handle = scripted(vl, "cat <|end_of_sentence|>")
    img = as_tensor(pil_images(0, 1))
    gen = node("Generate")
    gen.run(handle, img, "read the text in the image", "", "", False, 4, 0.0, 0.8, 0)
    gen.run(handle, img, "free question", PRESETS["read the text in the image"], "", False, 4, 0.0, 0.8, 0)
    gen.run(handle, img, "describe as text-to-image prompt", "", "", False, 4, 0.0, 0.8, 0)
    gen.run(handle, img, "describe as text-to-image prompt", "red poster", "", False, 4, 0.0, 0.8, 0)
    ocr, typed, describe, describe_more = handle.module.prompts
    assert ocr == typed and ocr != describe
    tok = handle.tokenizer
    assert words(tok, describe_more).startswith(words(tok, describe[:-6]))  # same instruction, then the extra
    assert "red poster Assistant:" in words(tok, describe_more) and "red poster" not in words(tok, describe)


# loader errors ----------------------------------------------------------------------------------------------
def test_loader_errors(tmp_path):
    from letterpress.loaders import ernie_vl as load
    from letterpress.loaders.storage import Storage

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "ernie4_5_moe_vl"}))
    with pytest.raises(LetterpressError, match="remote code"):
        load.load(str(old), Storage())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "ernie4_5_vl_moe"}))
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LetterpressError, match="only holds pickle"):
        load.load(str(pickled), Storage())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LetterpressError, match="not ERNIE-4.5-VL"):
        load.load(str(other), Storage())
    with pytest.raises(LetterpressError, match="not found in the LLM"):
        node("Loader").run("Not-There", "auto")


def test_loader_lists_ernie_vl_folders_first_and_names_another_model(ernie_vl, models_dir):
    os.makedirs(os.path.join(models_dir, "LLM", "some-llama"), exist_ok=True)
    with open(os.path.join(models_dir, "LLM", "some-llama", "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    choices = N["LetterpressErnieVLLoader"].INPUT_TYPES()["required"]["folder"][0]
    assert sorted(choices[:2]) == [PT, THINKING] and "some-llama" in choices[2:]
    assert N["LetterpressErnieVLLoader"].VALIDATE_INPUTS(folder="some-llama").startswith(
        "some-llama holds a 'llama' model; the ERNIE-VL Loader needs model_type ernie4_5_vl_moe.")


def test_model_goes_through_the_host(ernie_vl, monkeypatch):
    """The loader wraps the model for the memory manager; Generate asks the host to load it before running."""
    calls = []
    host = get_host()
    monkeypatch.setattr(host, "wrap", lambda h: calls.append(("wrap", h.role)) or h)
    original = host.load
    monkeypatch.setattr(host, "load", lambda *hs: calls.append(("load", hs[0].role)) or original(*hs))
    model = node("Loader").run(PT, "auto")[0]
    ask(model, as_tensor(pil_images(0, 1)), tokens=2)
    assert calls == [("wrap", "vl_model"), ("load", "vl_model")]


def test_a_processor_saved_by_transformers_5_loads_and_answers_the_same(ernie_vl, vl, reference, tmp_path, host):
    """Ernie4_5_VLMoeProcessor.save_pretrained writes the image processor inside processor_config.json (no
    preprocessor_config.json); transformers' AutoProcessor loads that folder, and so must the loader, to the same
    tokens as the original layout and transformers' own generate()."""
    import shutil

    from transformers import AutoProcessor, Ernie4_5_VLMoeProcessor, Ernie4_5_VLMoeVideoProcessor

    from fixtures.ernie_vl import CHAT_TEMPLATE, image_processor

    folder = tmp_path / "LLM" / "Resaved"
    shutil.copytree(ernie_vl["folder"], folder)
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    # the video processor keeps transformers' defaults (its temporal patch size must stay 2); no font to draw with
    video = Ernie4_5_VLMoeVideoProcessor(patch_size=14, merge_size=2, draw_on_frames=False)
    Ernie4_5_VLMoeProcessor(image_processor=image_processor(), tokenizer=reference[1], video_processor=video,
                            chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((folder / "processor_config.json").read_text())
    assert AutoProcessor.from_pretrained(folder).image_processor.size == image_processor().size  # transformers loads it
    host.models_dir = str(tmp_path)
    assert node("Loader").VALIDATE_INPUTS(folder="Resaved") is True
    resaved = node("Loader").run("Resaved", "auto")[0]
    images = pil_images(SEEDS[1], 1)
    ref = reference_ids(reference, images, thinking=False, tokens=16)
    body = ref[:-1] if ref and ref[-1] == reference[1].eos_token_id else ref
    answer = ask(resaved, as_tensor(images), tokens=16)[0]
    assert answer == ask(vl, as_tensor(images), tokens=16)[0] == words(reference[1], body)
