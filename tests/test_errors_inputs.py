"""Bad input reaching the loaders and samplers through files, links or scripts: damaged tokenizers, odd LoRAs,
off-image or hand-written boxes, extreme image shapes and out-of-range generation values each give one clear
LetterpressError naming the problem and the fix."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N


def node(name):
    return N["Letterpress" + name]()


# 1. damaged tokenizers ----------------------------------------------------------------------------------
def test_half_written_tokenizer_json_names_the_file(ernie, models_dir, tmp_path, host):
    folder = tmp_path / "models" / "diffusers" / "ERNIE-Image"
    shutil.copytree(os.path.join(models_dir, "diffusers", "ERNIE-Image"), folder)
    tok = folder / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text()[: tok.stat().st_size // 2])
    host.models_dir = str(tmp_path / "models")
    with pytest.raises(LetterpressError, match=r"the tokenizer in .*tokenizer cannot be read \(tokenizer.json is cut "
                                               r"short or not JSON: .*\): download tokenizer.json again"):
        node("ErnieImageFolderLoader").run("ERNIE-Image", "auto", False)


def test_tokenizer_without_tokenizer_json(ernie, models_dir, tmp_path):
    from letterpress.loaders.llm import load_tokenizer

    shutil.copy(os.path.join(models_dir, "diffusers", "ERNIE-Image", "tokenizer", "tokenizer_config.json"), tmp_path)
    with pytest.raises(LetterpressError, match=r"tok: the tokenizer in .* cannot be read \(no vocabulary: tokenizer.json is missing\)"
                                               r": download tokenizer.json again"):
        load_tokenizer([str(tmp_path)], "tok", "")


@pytest.mark.parametrize("family", ["glm", "ernie_vl"])
def test_damaged_processor_files_name_the_file(family, glm, ernie_vl, models_dir, tmp_path, host):
    """GLM-Image's processor (its tokenizer.json) and ERNIE-VL's image processor (preprocessor_config.json)."""
    sub, name, damaged, loader, args = {
        "glm": ("diffusers/GLM-Image", "GLM-Image", "processor/tokenizer.json", "GlmImageARLoader", ("auto",)),
        "ernie_vl": ("LLM/ERNIE-4.5-VL-28B-A3B-PT", "ERNIE-4.5-VL-28B-A3B-PT", "preprocessor_config.json",
                     "ErnieVLLoader", ("auto",)),
    }[family]
    folder = tmp_path / "models" / sub
    shutil.copytree(os.path.join(models_dir, sub), folder)
    path = folder / damaged
    path.write_text(path.read_text()[: path.stat().st_size // 2])
    host.models_dir = str(tmp_path / "models")
    leaf = os.path.basename(damaged)
    with pytest.raises(LetterpressError, match=rf"(processor|image processor) in .* cannot be read \({leaf} is cut short "
                                               rf"or not JSON: .*\): download {leaf} again"):
        node(loader).run(name, *args)


def test_a_tokenizer_that_fails_for_another_reason_is_not_blamed_on_a_file(ernie, models_dir, tmp_path):
    """Files that are there and valid JSON but that the tokenizers library cannot use (here a tokenizer.json of a
    format it does not know): the error is passed on, with what to check, and no file is called missing or cut."""
    from letterpress.loaders.llm import load_tokenizer

    shutil.copytree(os.path.join(models_dir, "diffusers", "ERNIE-Image", "tokenizer"), tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"version": "99.0"}))
    with pytest.raises(LetterpressError, match=r"cannot be read \(\w+: .*\): check that the folder is complete "
                                               r"\(tokenizer.json, tokenizer_config.json\) and that transformers"):
        load_tokenizer([str(tmp_path / "tok")], "tok", "")


# 2. LoRA files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit(ernie):
    return node("ErnieImageFolderLoader").run("ERNIE-Image", "auto", False)[0]


def apply_lora(dit, tmp_path, tensors):
    path = str(tmp_path / "lora.safetensors")
    save_file(tensors, path)
    return node("ErnieImageLoraLoader").run(dit, path, 1.0)


LAYER = "layers.0.self_attention.to_q"


@pytest.mark.parametrize("tensors, message", [
    ({f"transformer.{LAYER}.lora_A.weight": torch.zeros(0, 64), f"transformer.{LAYER}.lora_B.weight": torch.zeros(64, 0)},
     f"{LAYER} has rank 0 .*damaged"),
    ({f"transformer.{LAYER}.lora_A.weight": torch.zeros(2, 64), f"transformer.{LAYER}.lora_B.weight": torch.zeros(64, 2),
      f"transformer.{LAYER}.alpha": torch.tensor([1.0, 2.0])},
     f"transformer.{LAYER}.alpha holds 2 values, not one alpha; the file is damaged"),
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 64),
      "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(64, 2),
      "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(2.0)},
     r"made for another model family: the ERNIE-Image DiT has no input_blocks_1_1_proj_in"),
    ({f"transformer.{LAYER}.lora_A.weight": torch.zeros(2, 64, dtype=torch.int32),
      f"transformer.{LAYER}.lora_B.weight": torch.zeros(64, 2)},
     f"transformer.{LAYER}.lora_A.weight is stored as int32, not as floating-point weights"),
], ids=["rank0", "alpha2", "kohya_sd", "int32"])
def test_odd_lora_files(dit, tmp_path, tensors, message):
    with pytest.raises(LetterpressError, match=message):
        apply_lora(dit, tmp_path, tensors)


# 3. boxes -----------------------------------------------------------------------------------------------
def test_box_outside_the_image_is_dropped_and_reported():
    img = torch.zeros(1, 64, 64, 3)
    answer = ('[{"label": "sign", "bbox_2d": [1200, 100, 1500, 300]}, {"label": "cat", "bbox_2d": [0, 0, 500, 500]}, '
              '{"label": "dot", "bbox_2d": [300, 300, 300, 300]}]')  # a point (a tiny object) is kept
    out = node("ErnieVLParseBoxes").run(answer, img, "")[0]
    data = json.loads(out)
    assert [b["label"] for b in data["boxes"]] == ["cat", "dot"]
    assert [(d["label"], d["box_1000"]) for d in data["dropped"]] == [("sign", [1200, 100, 1500, 300])]
    assert node("ErnieVLDrawBoxes").run(img, out, 3, True)[0].shape == img.shape


def test_boxes_under_one_pixel_and_swapped_are_drawn():
    img = torch.zeros(1, 16, 16, 3)
    boxes = {"boxes": [{"box": [5.2, 5.2, 5.4, 5.4], "label": "dot"}, {"box": [12, 12, 8, 8]}]}
    out = node("ErnieVLDrawBoxes").run(img, json.dumps(boxes), 1, False)[0]
    lit = out[0].abs().sum(-1) > 0
    assert lit[5, 5] and lit[8, 8] and lit[11, 11] and not lit[9, 9]


@pytest.mark.parametrize("box, message", [
    ({"box": ["a", "b", "c", "d"]}, r"Box 2 .*'box' must be four numbers .*got \['a', 'b', 'c', 'd'\]"),
    ({"box": [1, 2, 3, 4], "image": "first"}, r"Box 2 .*'image' must be the image's index .*got 'first'"),
], ids=["non_numbers", "image_name"])
def test_hand_written_boxes_with_bad_values(box, message):
    boxes = json.dumps({"boxes": [{"box": [1, 1, 4, 4]}, box]})
    with pytest.raises(LetterpressError, match=message):
        node("ErnieVLDrawBoxes").run(torch.zeros(1, 8, 8, 3), boxes, 1, True)


# 4. and 5. through the generating nodes ----------------------------------------------------------------
@pytest.fixture(scope="module")
def vl(ernie_vl):
    return node("ErnieVLLoader").run("ERNIE-4.5-VL-28B-A3B-PT", "auto")[0]


def test_too_narrow_image_for_ernie_vl(vl):
    with pytest.raises(LetterpressError, match=r"Image 1 is 300x1 pixels, too narrow .*up to 200:1\. Crop it or pad"):
        node("ErnieVLGenerate").run(vl, torch.rand(1, 1, 300, 3), "free question", "what?", "", False, 2, 0.0, 0.8, 0)


BAD_VALUES = [  # (max_new_tokens, temperature, top_p, seed), message
    ((0, 0.7, 0.9, 0), r"max_new_tokens must be at least 1, got 0"),
    ((2, float("nan"), 0.9, 0), r"temperature must be 0 \(greedy\) or a positive number, got nan"),
    ((2, -1.0, 0.9, 0), r"temperature must be 0 \(greedy\) or a positive number, got -1.0"),
    ((2, 0.7, -0.1, 0), r"top_p must be between 0 and 1, got -0.1"),
    ((2, 0.7, 1.5, 0), r"top_p must be between 0 and 1, got 1.5"),
    ((2, 0.7, 0.9, 2**64), r"seed must be between 0 and 2\^64-1, got 18446744073709551616"),
]
IDS = ["tokens0", "temp_nan", "temp_neg", "top_p-0.1", "top_p1.5", "seed2^64"]


@pytest.fixture(scope="module")
def pe(ernie):
    return node("ErnieImageFolderLoader").run("ERNIE-Image", "auto", True)[3]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=IDS)
def test_generation_values_prompt_enhance(pe, values, message):
    tokens, temperature, top_p, seed = values
    with pytest.raises(LetterpressError, match=message):
        node("ErnieImagePromptEnhance").run(pe, "x", 32, 32, seed, temperature, top_p, tokens)


def test_top_p_zero_keeps_the_most_likely_token(pe):
    """top_p 0 (the widget allows it) decodes greedily, whatever the temperature and seed."""
    run = lambda temperature, top_p, seed: node("ErnieImagePromptEnhance").run(pe, "x", 32, 32, seed, temperature,  # noqa: E731
                                                                             top_p, 6)[0]
    assert run(0.7, 0.0, 1) == run(1.5, 0.0, 2) == run(0.0, 0.9, 3)


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=IDS)
def test_generation_values_vl_generate(vl, values, message):
    tokens, temperature, top_p, seed = values
    with pytest.raises(LetterpressError, match=message):
        node("ErnieVLGenerate").run(vl, torch.rand(1, 32, 32, 3), "free question", "what?", "", False, tokens,
                                    temperature, top_p, seed)


@pytest.mark.parametrize("values, message", BAD_VALUES[1:], ids=IDS[1:])  # AR Tokens sets its own length
def test_generation_values_ar_tokens(glm_models, values, message):
    _, temperature, top_p, seed = values
    with pytest.raises(LetterpressError, match=message):
        node("GlmImageARTokens").run(glm_models["ar"], "x", 32, 32, seed, temperature, top_p)


def test_size_above_the_widget_range_is_refused_when_wired():
    """A width from a Primitive skips the widget's range inside ComfyUI; the node's own check still refuses it."""
    from letterpress.samplers.ernie_image import check_size

    with pytest.raises(LetterpressError, match="width 8208 is above the largest size the nodes take, 8192"):
        check_size(8208, 1024)
    check_size(8192, 1024)


def test_preview_any_shows_values_as_comfyui_does():
    from letterpress.core_nodes import PreviewAny

    shown = [PreviewAny().main(v)["ui"]["text"][0] for v in ("a b", None, True, 3, {"k": [1]})]
    assert shown == ["a b", "None", "True", "3", '{"k": [1]}']
