"""Text check without an OCR engine: the quoted-span rule against diffusers' GLM-Image pipeline, Word
Accuracy and NED against hand-computed cases, Best of Batch ranking, and the nodes' errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.runner import Runner, load_workflow, set_values
from letterpress.samplers import text_ocr
from letterpress.samplers.text_metrics import levenshtein, score_text, words
from letterpress.samplers.text_spans import quoted_spans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [
    'A poster that reads "HELLO WORLD" in red',
    "a sign saying 'OPEN' and a banner \u201cGrand Sale\u201d, a label \"50% OFF\" and \u300c\u65b0\u5e74\u5feb\u4e50\u300d",
    "the cat's bowl says 'MEOW' and the dog's says \"WOOF\"",  # apostrophes count as quotes in the reference
    'two "A" and "B" and an unclosed "C',
    'empty "" and \u201c\u201d and \'\' spans',
    "nested \u201couter 'inner' outer\u201d and \"x 'y' z\"",
    'line one "FIRST\nSECOND" across a newline',
    "no quotes at all",
    "",
    "\u300c\u4e00\u300d\u300c\u4e8c\u300d 'a' \"b\" \u201cc\u201d",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_quoted_spans_match_the_glm_image_reference(prompt):
    from diffusers.pipelines.glm_image.pipeline_glm_image import GlmImagePipeline

    reference = GlmImagePipeline.get_glyph_texts(None, prompt)  # the method does not use self
    assert quoted_spans(prompt) == reference[0]


def test_quoted_spans_order_is_by_quote_kind_not_position():
    assert quoted_spans("\u300cZ\u300d \"Y\" \u201cX\u201d 'W'") == ["W", "X", "Y", "Z"]
    assert quoted_spans("the cat's 'MEOW' and dog's bowl") == ["s ", " and dog"]


def approx(x):
    return pytest.approx(x, abs=1e-9)


def test_word_accuracy_and_ned_hand_computed():
    # exact match
    s = score_text("HELLO WORLD", ["HELLO WORLD"])
    assert (s.word_accuracy, s.ned, s.edit_distance) == (1.0, 1.0, 0)
    # one wrong letter: 1 of 2 words right; "helloworld" vs "hellow0rld" is 1 edit in 10 characters
    s = score_text("HELLO WORLD", ["HELLO W0RLD"])
    assert s.word_accuracy == approx(0.5) and s.ned == approx(0.9) and s.normalised_distance == approx(0.1)
    assert s.misspelled == [("world", "w0rld")] and s.missing == [] and s.extra == []
    # a missing word: 2 of 3 words; 5 deletions from 17 characters
    s = score_text("GRAND OPENING TODAY", ["GRAND", "OPENING"])
    assert s.word_accuracy == approx(2 / 3) and s.ned == approx(1 - 5 / 17) and s.missing == ["today"]
    # extra words do not lower word accuracy but do lower NED: "sale" vs "bigsalenow" is 6 edits in 10
    s = score_text("SALE", ["BIG SALE NOW"])
    assert s.word_accuracy == 1.0 and s.ned == approx(0.4) and s.extra == ["big", "now"]
    # every read word vouches for one expected word only
    s = score_text("SALE SALE", ["SALE"])
    assert s.word_accuracy == approx(0.5) and s.ned == approx(0.5)
    # empty expected text: nothing missed; NED 1 when nothing was read, 0 when anything was
    s = score_text("", [])
    assert (s.word_accuracy, s.ned) == (1.0, 1.0)
    s = score_text("", ["X"])
    assert (s.word_accuracy, s.ned, s.extra) == (1.0, 0.0, ["x"])
    # several expected texts: the order the prompt quotes them in does not count, only what the image shows
    s = score_text(["OPEN DAILY", "FRESH COFFEE"], ["FRESH COFFEE", "OPEN DAILY"])
    assert (s.word_accuracy, s.ned) == (1.0, 1.0) and s.expected_words == ["fresh", "coffee", "open", "daily"]
    s = score_text(["OPEN DAILY", "FRESH COFFEE"], ["FRESH COFEE", "OPEN DAILY"])  # 1 edit in 20 characters
    assert s.word_accuracy == approx(3 / 4) and s.ned == approx(0.95) and s.misspelled == [("coffee", "cofee")]
    s = score_text(["OPEN DAILY", "FRESH COFFEE"], ["FRESH COFFEE"])  # 9 deletions from 20 characters
    assert s.word_accuracy == approx(0.5) and s.ned == approx(0.55) and s.missing == ["open", "daily"]
    # nothing read: every word missing, NED 0
    s = score_text("HELLO", [])
    assert (s.word_accuracy, s.ned, s.missing) == (0.0, 0.0, ["hello"])


def test_cjk_counts_per_character():
    assert words("\u65b0\u5e74\u5feb\u4e50 AI\u7ed8\u753b 2025") == ["\u65b0", "\u5e74", "\u5feb", "\u4e50", "ai",
                                                                     "\u7ed8", "\u753b", "2025"]
    # one character of four wrong: 3/4 words, 1 edit in 4 characters
    s = score_text("\u65b0\u5e74\u5feb\u4e50", ["\u65b0\u5e74\u5feb\u4e1c"])
    assert s.word_accuracy == approx(0.75) and s.ned == approx(0.75)
    assert s.missing == ["\u4e50"] and s.extra == ["\u4e1c"]
    # OCR that drops the space between CJK groups loses nothing
    s = score_text("\u6b22\u8fce\u5149\u4e34 \u5496\u5561\u5e97", ["\u6b22\u8fce\u5149\u4e34\u5496\u5561\u5e97"])
    assert (s.word_accuracy, s.ned) == (1.0, 1.0)


def test_normalisation_case_punctuation_width():
    s = score_text("Hello, World!", ["HELLO WORLD"])
    assert (s.word_accuracy, s.ned) == (1.0, 1.0)
    s = score_text("Hello", ["HELLO"], case_sensitive=True)
    assert s.word_accuracy == 0.0 and s.ned == approx(1 - 4 / 5)
    assert words("\uff28\uff25\uff2c\uff2c\uff2f\u3000\uff11\uff12") == ["hello", "12"]  # full-width forms
    # spaces are not checked: a read word that splits exactly into expected words counts as those words
    s = score_text("BLUE NOTE JAZZ", ["BLUENOTEJAZZ"])
    assert (s.word_accuracy, s.ned, s.extra) == (1.0, 1.0, [])
    s = score_text("BLUE NOTE JAZZ", ["BLUENOTEJAZ"])  # no exact split: one read word, 1 edit in 12 characters
    assert s.word_accuracy == 0.0 and s.ned == approx(1 - 1 / 12) and s.extra == ["bluenotejaz"]


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert levenshtein("flaw", "lawn") == 2


def fake_read(*texts_per_image):
    return [{"engine": "test", "width": 8, "height": 8,
             "lines": [{"text": t, "score": 1.0, "box": [[0, 0], [1, 0], [1, 1], [0, 1]]} for t in texts]}
            for texts in texts_per_image]


def test_text_accuracy_node_defaults_to_the_prompt_quotes():
    read = fake_read(["GRAND OPENING"], ["GRAND 0PENING", "TODAY"], ["GRAND", "OPENING", "TODAY"])
    scores, report, js = N["LetterpressTextAccuracy"]().run(
        read, 'A shop window with "GRAND OPENING" and \u201cTODAY\u201d', "", False, "lenient")
    assert scores["names"] == ["word_accuracy", "ned"]
    assert [v[0] for v in scores["values"]] == [approx(2 / 3), approx(2 / 3), 1.0]
    assert scores["expected"] == ["TODAY", "GRAND OPENING"]  # reference order: curly quotes before straight ones
    assert "image 1" in report and "'opening' read as '0pening'" in report and "missing: 'today'" in report
    data = json.loads(js)
    assert data["images"][2]["word_accuracy"] == 1.0
    # expected_text wins over the prompt
    scores, _, _ = N["LetterpressTextAccuracy"]().run(read, 'says "SOMETHING ELSE"', "GRAND OPENING", False, "lenient")
    assert [v[0] for v in scores["values"]] == [1.0, 0.5, 1.0]


def test_text_accuracy_needs_something_to_check():
    with pytest.raises(LetterpressError, match="nothing to check"):
        N["LetterpressTextAccuracy"]().run(fake_read(["X"]), "a poster without quotes", "  ", False)
    with pytest.raises(LetterpressError, match="read_text output of Read Text"):
        N["LetterpressTextAccuracy"]().run("HELLO", 'a "HELLO" poster', "", False)


def test_best_of_batch_picks_the_best_and_breaks_ties_by_index():
    images = torch.stack([torch.full((4, 4, 3), i / 10) for i in range(4)])
    scores = {"names": ["word_accuracy", "ned"], "values": [[0.5, 0.9], [1.0, 0.8], [1.0, 0.95], [1.0, 0.95]]}
    best, index, ranking = N["LetterpressTextBestOfBatch"]().run(images, scores, "word_accuracy")
    assert index == 2 and torch.equal(best, images[2:3])  # 2 and 3 tie on both: the lower index wins
    assert ranking.splitlines()[0].startswith("1. image 2: word_accuracy 1.000, ned 0.950")
    assert [int(line.split("image ")[1].split(":")[0]) for line in ranking.splitlines()] == [2, 3, 1, 0]
    _, index, _ = N["LetterpressTextBestOfBatch"]().run(images, scores, "ned")
    assert index == 2  # ned first: 0.95 (2, 3) > 0.9 (0) > 0.8 (1)
    tie = {"names": ["word_accuracy", "ned"], "values": [[0.0, 0.0]] * 4}
    assert N["LetterpressTextBestOfBatch"]().run(images, tie, "word_accuracy")[1] == 0
    with pytest.raises(LetterpressError, match="4 images but 3 scores"):
        N["LetterpressTextBestOfBatch"]().run(images, {"names": ["word_accuracy", "ned"], "values": [[1, 1]] * 3},
                                              "word_accuracy")


def test_missing_ocr_package_names_what_to_install(monkeypatch):
    real = text_ocr.importlib.util.find_spec
    monkeypatch.setattr(text_ocr, "_engine", None)
    monkeypatch.setattr(text_ocr.importlib.util, "find_spec", lambda name, *a: None if name == "rapidocr" else real(name, *a))
    with pytest.raises(LetterpressError, match=r"needs the package\(s\) rapidocr.*pip install rapidocr onnxruntime"):
        N["LetterpressTextRead"]().run(torch.zeros(1, 32, 32, 3), 0.5)


def test_bad_image_input():
    for bad in (torch.zeros(32, 32, 3), torch.zeros(0, 32, 32, 3), torch.zeros(1, 32, 32, 2)):
        with pytest.raises(LetterpressError, match=r"Read Text: an IMAGE is \(batch >= 1, height, width"):
            N["LetterpressTextRead"]().run(bad, 0.5)


def test_shipped_workflow_is_valid(ernie):
    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "text_best_of_4_api.json"))
    order = Runner().validate(wf)
    types = [wf[n]["class_type"] for n in order]
    assert types.index("LetterpressTextRead") < types.index("LetterpressTextAccuracy") < \
        types.index("LetterpressTextBestOfBatch") < types.index("SaveImage")
    latent = next(n for n in wf.values() if n["class_type"] == "LetterpressErnieImageEmptyLatent")
    assert latent["inputs"]["batch_size"] == 4
    # the prompt is typed once: one String node feeds both Text Encode and Text Accuracy
    encode = next(n for n in wf.values() if n["class_type"] == "LetterpressErnieImageTextEncode"
                  and n["_meta"]["title"] == "Text Encode")["inputs"]
    accuracy = next(n for n in wf.values() if n["class_type"] == "LetterpressTextAccuracy")["inputs"]
    assert encode["prompt"] == accuracy["prompt"] and wf[encode["prompt"][0]]["class_type"] == "PrimitiveStringMultiline"
    assert quoted_spans(wf[encode["prompt"][0]]["inputs"]["value"])
    nid = encode["prompt"][0]
    assert set_values(wf, [f"{nid}.value=say 'HELLO'"])[nid]["inputs"]["value"] == "say 'HELLO'"


def test_vl_answers_become_lines():
    from letterpress.samplers.ernie_vl import parse_boxes

    answer = ('```json\n[{"text": "FRIDAY 9 PM", "bbox_2d": [300, 400, 700, 520]}, '
              '{"text": "BLUE NOTE JAZZ", "bbox_2d": [100, 100, 900, 300]}]\n```')
    lines = text_ocr.vl_lines(answer, 1000, 500, parse_boxes)
    assert [ln["text"] for ln in lines] == ["BLUE NOTE JAZZ", "FRIDAY 9 PM"]  # reading order
    assert lines[0]["box"] == [[100.0, 50.0], [900.0, 50.0], [900.0, 150.0], [100.0, 150.0]]  # 0..1000 -> pixels
    assert lines[0]["score"] is None
    plain = text_ocr.vl_lines("BLUE NOTE JAZZ\n\nFRIDAY 9 PM\n", 1000, 500, parse_boxes)
    assert plain == [{"text": "BLUE NOTE JAZZ", "score": None, "box": None},
                     {"text": "FRIDAY 9 PM", "score": None, "box": None}]


def test_vl_engine_reads_without_touching_pp_ocr(ernie_vl, monkeypatch):
    from letterpress.samplers import ernie_vl as vl

    model = N["LetterpressErnieVLLoader"]().run("ERNIE-4.5-VL-28B-A3B-PT", "auto")[0]
    monkeypatch.setattr(text_ocr, "VL_MAX_NEW_TOKENS", 6)
    monkeypatch.setattr(text_ocr, "rapidocr_engine", lambda: pytest.fail("PP-OCR must not run when a VL model is wired"))
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    results, js, plain = N["LetterpressTextRead"]().run(images, 0.5, vl_model=model)
    assert [r["engine"] for r in results] == ["ERNIE-4.5-VL"] * 2 and results[0]["width"] == 64
    for i, r in enumerate(results):  # what the VL model answered to the read-text prompt, as lines
        answer, _ = vl.vl_generate(model, images[i:i + 1], text_ocr.VL_READ_PROMPT, "", False, 6, 0.0, 1.0, 0)
        assert r["lines"] == text_ocr.vl_lines(answer, 64, 48, vl.parse_boxes)
    assert json.loads(js) == results


def test_vl_engine_missing_is_an_error_not_a_fallback(monkeypatch):
    def missing(name, package=None):
        raise ModuleNotFoundError("No module named 'letterpress.samplers.ernie_vl'", name="letterpress.samplers.ernie_vl")

    monkeypatch.setattr(text_ocr.importlib, "import_module", missing)
    monkeypatch.setattr(text_ocr, "rapidocr_engine", lambda: pytest.fail("no silent fallback to PP-OCR"))
    with pytest.raises(LetterpressError, match="ERNIE-4.5-VL engine of Read Text is not available"):
        N["LetterpressTextRead"]().run(torch.zeros(1, 32, 32, 3), 0.5, vl_model=object())
