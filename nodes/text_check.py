"""Text that is right: read back what was rendered, score it against what was asked, keep the best.

Thin nodes over samplers/text_ocr.py (engines), samplers/text_metrics.py (Word Accuracy, NED) and
samplers/text_spans.py (the quoted spans of a prompt, the same rule the glyph encoders use).
"""

from __future__ import annotations

import json

from ..loaders import families
from ..loaders.errors import LetterpressError
from ..samplers import text_metrics as metrics
from ..samplers import text_ocr as ocr
from ..samplers.text_spans import quoted_spans
from .common import CATEGORY

CAT = f"{CATEGORY}/Text check"
READ = "LP_READ_TEXT"  # per image: {"engine", "width", "height", "lines": [{"text", "score", "box"}]}
SCORES = "LP_SCORES"  # {"names": [...], "values": [[...] per image], "details": [...]}
READER = families.text_reader()  # the family whose model can read instead of PP-OCR (loaders/families.py)
VL = READER.text_reader.io_type if READER else "LP_VL_MODEL"
VL_TITLE = READER.title if READER else "a vision-language model"
RANK_BY = ["word_accuracy", "ned"]
METRIC_TOOLTIP = (
    "cvtg-2k: exactly CVTG-2K's evaluation (TextCrafter's unified_metrics_eval.py), comparable with published tables: "
    "expected words = the quoted spans (the prompt's single-quoted ones when it has any, as the script takes them) "
    "lower-cased and split on spaces; read words = each read line lower-cased and split; Word Accuracy = share of "
    "expected words present among the read words (punctuation counts: 'hello!' is not 'hello'); NED = mean over "
    "expected words of 1 - Levenshtein(word, closest read word by difflib) / max length. Extra read words change "
    "neither. lenient: the pack's own score: Unicode-normalised words without punctuation, each read word matching "
    "one expected word, merged capitals split ('BLUENOTEJAZZ'), NED over the whole texts (extra read text lowers it).")


class LetterpressTextRead:
    DESCRIPTION = ("Reads the text in every image of a batch: lines with their boxes, as JSON and as plain text. "
                   "PP-OCR (rapidocr package, CPU, Chinese and English) by default; " + VL_TITLE + " when a VL model "
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
                "vl_model": (VL, {"tooltip": f"An {VL_TITLE} model (from its loader): when wired, it reads instead "
                                             "of PP-OCR, greedily, one image at a time; min_confidence does not apply."}),
            },
        }

    def run(self, images, min_confidence, vl_model=None):
        results = ocr.read_text(images, vl_model=vl_model, min_score=min_confidence)
        return (results, json.dumps(results, ensure_ascii=False), ocr.plain_text(results))


class LetterpressTextAccuracy:
    DESCRIPTION = ("Scores the read text of each image against the expected text: Word Accuracy and NED, by the metric "
                   "chosen: cvtg-2k (default) computes them exactly as CVTG-2K's evaluation script does, so they "
                   "compare with the published tables; lenient is the pack's own forgiving score. Plus a readable "
                   "report of missed, misspelled and extra words. The expected text is expected_text when given, "
                   "else the quoted spans of the prompt.")
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
            "case_sensitive": ("BOOLEAN", {"default": False, "tooltip": "lenient only (cvtg-2k always ignores case, as "
                                                                        "CVTG-2K does). Off: HELLO and hello count as "
                                                                        "the same word."}),
            "metric": (list(metrics.METRICS), {"default": "cvtg-2k", "tooltip": METRIC_TOOLTIP}),
        }}

    def run(self, read_text, prompt, expected_text, case_sensitive, metric="cvtg-2k"):
        if not isinstance(read_text, list) or not all(isinstance(r, dict) and "lines" in r for r in read_text):
            raise LetterpressError("Text Accuracy needs the read_text output of Read Text.")
        if metric not in metrics.METRICS:
            raise LetterpressError(f"Text Accuracy: metric '{metric}' is not one of {', '.join(metrics.METRICS)}.")
        if expected_text.strip():
            expected = [expected_text]
        else:  # cvtg-2k: the single-quoted spans as CVTG-2K's script takes them, when the prompt has any
            expected = (metric == "cvtg-2k" and metrics.cvtg_spans(prompt)) or quoted_spans(prompt)
            if not any(s.strip() for s in expected):
                raise LetterpressError("Text Accuracy has nothing to check: the prompt has no quoted text ('..', "
                                       "\u201c..\u201d, \"..\" or \u300c..\u300d) and expected_text is empty. Quote "
                                       "the text in the prompt or type it into expected_text.")
        if metric == "cvtg-2k":
            scored = [metrics.cvtg2k_score(expected, [ln["text"] for ln in r["lines"]]) for r in read_text]
        else:
            scored = [metrics.score_text(expected, [ln["text"] for ln in r["lines"]], case_sensitive) for r in read_text]
        details = [s.as_dict() for s in scored]
        scores = {"names": list(RANK_BY), "values": [[s.word_accuracy, s.ned] for s in scored], "details": details,
                  "expected": expected, "metric": metric}
        header = f"metric: {metric}\nexpected: " + " | ".join(expected) + "\n"
        return (scores, header + metrics.report(scored), json.dumps({"metric": metric, "expected": expected,
                                                                      "images": details}, ensure_ascii=False))


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
