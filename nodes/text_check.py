"""Text that is right: read back what was rendered, score it against what was asked, keep the best.

Thin nodes over samplers/text_ocr.py (engines), samplers/text_metrics.py (Word Accuracy, NED) and
samplers/text_spans.py (the quoted spans of a prompt, the same rule GLM-Image's glyphs use).
"""

from __future__ import annotations

import json

from ..loaders.errors import LetterpressError
from ..samplers import text_metrics as metrics
from ..samplers import text_ocr as ocr
from ..samplers.text_spans import quoted_spans
from .common import CATEGORY

CAT = f"{CATEGORY}/Text check"
READ = "LP_READ_TEXT"  # per image: {"engine", "width", "height", "lines": [{"text", "score", "box"}]}
SCORES = "LP_SCORES"  # {"names": [...], "values": [[...] per image], "details": [...]}
VL = "LP_ERNIE_VL"
RANK_BY = ["word_accuracy", "ned"]


class LetterpressTextRead:
    DESCRIPTION = ("Reads the text in every image of a batch: lines with their boxes, as JSON and as plain text. "
                   "PP-OCR (rapidocr package, CPU, Chinese and English) by default; ERNIE-4.5-VL when a VL model "
                   "is wired in (slower, better on stylised text). A missing engine package is an error that says "
                   "what to install; no other engine is used in its place.")
    CATEGORY = CAT
    RETURN_TYPES = (READ, "STRING", "STRING")
    RETURN_NAMES = ("read_text", "json", "text")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to read (a batch reads each one)."}),
                "min_confidence": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                             "tooltip": "PP-OCR drops lines recognised with less confidence than this."}),
            },
            "optional": {
                "vl_model": (VL, {"tooltip": "An ERNIE-4.5-VL model (from its loader): when wired, it reads instead "
                                             "of PP-OCR, greedily, one image at a time; min_confidence does not apply."}),
            },
        }

    def run(self, images, min_confidence, vl_model=None):
        results = ocr.read_text(images, vl_model=vl_model, min_score=min_confidence)
        return (results, json.dumps(results, ensure_ascii=False), ocr.plain_text(results))


class LetterpressTextAccuracy:
    DESCRIPTION = ("Scores the read text of each image against the expected text: Word Accuracy (share of expected "
                   "words found) and NED (1 - normalised edit distance), as CVTG-2K reports them, plus a readable "
                   "report of missed, misspelled and extra words. The expected text is expected_text when given, "
                   "else the quoted spans of the prompt ('..', \u201c..\u201d, \"..\", \u300c..\u300d), as "
                   "GLM-Image's glyphs take them.")
    CATEGORY = CAT
    RETURN_TYPES = (SCORES, "STRING", "STRING")
    RETURN_NAMES = ("scores", "report", "json")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "read_text": (READ, {"tooltip": "From Read Text."}),
            "prompt": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "The generation prompt; its quoted spans are the expected text. An "
                                             "apostrophe counts as a quote here (the reference rule): type "
                                             "expected_text for prompts that have them."}),
            "expected_text": ("STRING", {"multiline": True, "default": "",
                                         "tooltip": "The text that should be in the image. When not empty it is "
                                                    "used instead of the prompt's quoted spans."}),
            "case_sensitive": ("BOOLEAN", {"default": False, "tooltip": "Off: HELLO and hello count as the same word."}),
        }}

    def run(self, read_text, prompt, expected_text, case_sensitive):
        if not isinstance(read_text, list) or not all(isinstance(r, dict) and "lines" in r for r in read_text):
            raise LetterpressError("Text Accuracy needs the read_text output of Read Text.")
        if expected_text.strip():
            expected = [expected_text]
        else:
            expected = quoted_spans(prompt)
            if not any(s.strip() for s in expected):
                raise LetterpressError("Text Accuracy has nothing to check: the prompt has no quoted text ('..', "
                                       "\u201c..\u201d, \"..\" or \u300c..\u300d) and expected_text is empty. Quote "
                                       "the text in the prompt or type it into expected_text.")
        scored = [metrics.score_text(expected, [ln["text"] for ln in r["lines"]], case_sensitive) for r in read_text]
        details = [s.as_dict() for s in scored]
        scores = {"names": list(RANK_BY), "values": [[s.word_accuracy, s.ned] for s in scored], "details": details,
                  "expected": expected}
        header = "expected: " + " | ".join(expected) + "\n"
        return (scores, header + metrics.report(scored), json.dumps({"expected": expected, "images": details},
                                                                     ensure_ascii=False))


class LetterpressTextBestOfBatch:
    DESCRIPTION = ("Keeps the best image of a batch by its scores (from Text Accuracy): the image, its index in the "
                   "batch and the whole ranking. rank_by picks the score compared first; the other breaks ties, "
                   "then the lower index wins.")
    CATEGORY = CAT
    RETURN_TYPES = ("IMAGE", "INT", "STRING")
    RETURN_NAMES = ("best_image", "best_index", "ranking")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The candidates, the same batch that was scored."}),
            "scores": (SCORES, {"tooltip": "From Text Accuracy, one score per image."}),
            "rank_by": (RANK_BY, {"default": "word_accuracy", "tooltip": "The score compared first (higher is better)."}),
        }}

    def run(self, images, scores, rank_by):
        if not isinstance(scores, dict) or "values" not in scores or "names" not in scores:
            raise LetterpressError("Best of Batch needs the scores output of Text Accuracy.")
        if rank_by not in scores["names"]:
            raise LetterpressError(f"rank_by '{rank_by}' is not among the scores ({', '.join(scores['names'])}).")
        values = scores["values"]
        if images.shape[0] != len(values):
            raise LetterpressError(f"Best of Batch got {images.shape[0]} images but {len(values)} scores: wire the same "
                                   "batch into Read Text and into Best of Batch.")
        first = scores["names"].index(rank_by)
        order = [first] + [i for i in range(len(scores["names"])) if i != first]
        keyed = [tuple(v[i] for i in order) for v in values]
        ranking = metrics.rank(keyed)
        best = ranking[0]
        lines = []
        for place, idx in enumerate(ranking, 1):
            shown = ", ".join(f"{scores['names'][i]} {values[idx][i]:.3f}" for i in order)
            lines.append(f"{place}. image {idx}: {shown}")
        return (images[best:best + 1], best, "\n".join(lines))


NODES = {c.__name__: c for c in (LetterpressTextRead, LetterpressTextAccuracy, LetterpressTextBestOfBatch)}
DISPLAY_NAMES = {
    "LetterpressTextRead": "Read Text",
    "LetterpressTextAccuracy": "Text Accuracy",
    "LetterpressTextBestOfBatch": "Best of Batch",
}
