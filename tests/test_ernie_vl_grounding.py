"""ERNIE-4.5-VL grounding: the box formats the model writes, 0..1000 -> pixel scaling, drawing a known box."""

from __future__ import annotations

import json

import pytest
import torch

from letterpress.loaders.errors import LetterpressError

from letterpress.loaders.handle import ModelHandle
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

from fixtures.ernie_vl import ScriptedModel

W, H = 200, 100  # pixel = value * W / 1000 horizontally, value * H / 1000 vertically


def parse(answer, labels="", width=W, height=H):
    out = N["LetterpressErnieVLParseBoxes"]().run(answer, torch.zeros(1, height, width, 3), labels)[0]
    data = json.loads(out)
    assert (data["width"], data["height"]) == (width, height)
    return [(b["label"], b["box"]) for b in data["boxes"]]


def test_loc_tokens():
    answer = ("cat<|LOC_BEGIN|><|LOC_100|><|LOC_200|><|LOC_500|><|LOC_600|><|LOC_END|> and "
              "red sign<|LOC_BEGIN|><|LOC_0|><|LOC_0|><|LOC_1000|><|LOC_1000|><|LOC_END|>")
    assert parse(answer) == [("cat", [20.0, 20.0, 100.0, 60.0]), ("and red sign", [0.0, 0.0, 200.0, 100.0])]


def test_loc_polygon_becomes_its_bounding_rectangle():
    # 4 corner points, clockwise from top-left, as ERNIE-family spotting writes them
    answer = "HELLO<|LOC_BEGIN|>" + "".join(f"<|LOC_{v}|>" for v in (100, 300, 900, 300, 900, 400, 100, 400)) + "<|LOC_END|>"
    assert parse(answer) == [("HELLO", [20.0, 30.0, 180.0, 40.0])]


def test_json_answer_with_fences():
    answer = ('Here you go:\n```json\n[{"label": "cat", "bbox_2d": [250, 500, 750, 1000]},\n'
              ' {"label": "dog", "bbox_2d": [0, 0, 100, 100]}]\n```')
    assert parse(answer) == [("cat", [50.0, 50.0, 150.0, 100.0]), ("dog", [0.0, 0.0, 20.0, 10.0])]


def test_plain_lists_swapped_corners_and_clamping():
    # corners given bottom-right first, and a coordinate past 1000: ordered and clamped to the image
    assert parse("the cat: [600, 800, 100, 200]") == [("the cat", [20.0, 20.0, 120.0, 80.0])]
    assert parse("[0, 0, 1200, 500]", labels="sign") == [("sign", [0.0, 0.0, 200.0, 50.0])]


def test_no_boxes_and_bad_box_json():
    assert parse("I cannot see any cat.") == []
    with pytest.raises(LetterpressError, match="not JSON"):
        N["LetterpressErnieVLDrawBoxes"]().run(torch.zeros(1, 8, 8, 3), "{broken", 2, False)
    with pytest.raises(LetterpressError, match="x1, y1, x2, y2"):
        N["LetterpressErnieVLDrawBoxes"]().run(torch.zeros(1, 8, 8, 3), json.dumps({"boxes": [{"box": [1, 2]}]}), 2, False)


def test_draw_known_box():
    img = torch.zeros(2, 24, 32, 3)
    boxes = json.dumps({"boxes": [{"image": 1, "label": "cat", "box": [4, 6, 20, 18]}]})
    out = N["LetterpressErnieVLDrawBoxes"]().run(img, boxes, 2, False)[0]
    assert out.shape == img.shape and out[0].abs().max() == 0  # image 0 has no box
    lit = out[1].abs().sum(-1) > 0
    expected = torch.zeros(24, 32, dtype=torch.bool)
    expected[6:18, 4:20] = True  # the box covers x 4..19, y 6..17 (x2, y2 exclusive)
    expected[8:16, 6:18] = False  # a 2-pixel outline: the inside stays untouched
    assert torch.equal(lit, expected)
    colors = out[1][lit].unique(dim=0)
    assert colors.shape[0] == 1 and colors.max() == 1.0  # one saturated colour for the label


def test_draw_labels_writes_inside_the_box():
    img = torch.zeros(1, 48, 64, 3)
    boxes = json.dumps({"boxes": [{"image": 0, "label": "cat", "box": [2, 2, 62, 46]}]})
    plain = N["LetterpressErnieVLDrawBoxes"]().run(img, boxes, 1, False)[0]
    labelled = N["LetterpressErnieVLDrawBoxes"]().run(img, boxes, 1, True)[0]
    inside = (labelled - plain)[0, 4:44, 4:60]
    assert inside.abs().sum() > 0


def test_boxes_found_on_another_size_are_scaled_to_the_drawn_images():
    small = json.dumps({"width": 32, "height": 24, "boxes": [{"image": 0, "label": "", "box": [8, 6, 16, 12]}]})
    big = N["LetterpressErnieVLDrawBoxes"]().run(torch.zeros(1, 48, 64, 3), small, 1, False)[0][0]
    drawn = big.sum(-1).nonzero()
    assert (drawn[:, 0].min(), drawn[:, 0].max(), drawn[:, 1].min(), drawn[:, 1].max()) == (12, 23, 16, 31)


def test_ground_node_on_the_model_answer(ernie_vl):
    vl = N["LetterpressErnieVLLoader"]().run("ERNIE-4.5-VL-28B-A3B-PT", "auto")[0]
    tok = vl.processor.tokenizer
    answer = "cat <|LOC_BEGIN|> <|LOC_100|> <|LOC_200|> <|LOC_500|> <|LOC_600|> <|LOC_END|> <|end_of_sentence|>"
    fake = ModelHandle(family="ernie_vl", role="vl_model", module=ScriptedModel(tok.convert_tokens_to_ids(answer.split())),
                       tokenizer=tok, processor=vl.processor)
    boxes, text = N["LetterpressErnieVLGround"]().run(fake, torch.rand(2, H, W, 3), "cat, dog", False, 64, 0.0, 0.8, 0)
    data = json.loads(boxes)
    assert [(b["image"], b["label"], b["box"]) for b in data["boxes"]] == [
        (0, "cat", [20.0, 20.0, 100.0, 60.0]), (1, "cat", [20.0, 20.0, 100.0, 60.0])]  # one request per image
    assert len(fake.module.prompts) == 2 and text.count("<|LOC_BEGIN|>") == 2
    unlabelled = "<|LOC_BEGIN|> <|LOC_100|> <|LOC_200|> <|LOC_500|> <|LOC_600|> <|LOC_END|> <|end_of_sentence|>"
    fake.module = ScriptedModel(tok.convert_tokens_to_ids(unlabelled.split()))
    boxes, _ = N["LetterpressErnieVLGround"]().run(fake, torch.rand(1, H, W, 3), "cat;", False, 64, 0.0, 0.8, 0)
    assert [b["label"] for b in json.loads(boxes)["boxes"]] == ["cat"]  # named as in the prompt, not "cat;"
    with pytest.raises(LetterpressError, match="at least one object"):
        N["LetterpressErnieVLGround"]().run(fake, torch.rand(1, H, W, 3), " , ", False, 64, 0.0, 0.8, 0)

    # and on the real tiny model: whatever it answers, the output is well-formed JSON
    boxes, text = N["LetterpressErnieVLGround"]().run(vl, torch.rand(1, 56, 56, 3), "cat", False, 8, 0.0, 0.8, 0)
    assert isinstance(json.loads(boxes)["boxes"], list) and text


@pytest.mark.parametrize("answer", [
    '{"objects": [{"label": "cat", "bbox_2d": [250, 500, 750, 1000]}, {"label": "dog", "bbox_2d": [0, 0, 100, 100]}]}',
    '{"cat": [250, 500, 750, 1000], "dog": {"bbox_2d": [[0, 0], [100, 100]]}}',
    '```json\n{"results": [{"name": "cat", "boxes": [[250, 500, 750, 1000]]}, {"name": "dog", "boxes": [[0, 0, 100, 100]]}]}\n```',
    '{"cat": [[250, 500, 750, 1000]], "dog": [[0, 0, 100, 100]], "count": 2}',
], ids=["under-objects", "by-name", "name-and-boxes", "lists-by-name"])
def test_nested_json_answers_keep_their_labels(answer):
    assert parse(answer) == [("cat", [50.0, 50.0, 150.0, 100.0]), ("dog", [0.0, 0.0, 20.0, 10.0])]
