"""How well an image's read-back text matches the text that was asked for: two metrics, named for what they are.

**cvtg-2k** (the default): exactly the computation of CVTG-2K's evaluation script (TextCrafter's
`unified_metrics_eval.py`, `UnifiedMetricsEvaluator.compute_ocr_metrics` / `get_ld`, read as vendored unchanged in
zlab-princeton/i1 `benchmark_eval/cvtg-2k/unified_metrics_eval.py`), so scores compare with the published tables of
the text-rendering models (the OCR engine differs: the script reads with PaddleOCR). Per image:
- expected words: every quoted span lower-cased (`str.lower`) and split on white space (`str.split`); the script
  takes the spans of single quotes with `re.findall(r"'(.*?)'", prompt)` (its prompts quote that way);
- read words: every OCR line lower-cased and split; `[""]` when nothing was read;
- Word Accuracy: the share of expected words that occur among the read words (`word in read_words`: a repeated
  expected word counts each time it occurs in the prompt, found once is enough; "hello!" is not "hello");
- NED, per expected word: 1 - Levenshtein(word, best) / (max(len(word), len(best)) + 1e-5), `best` being
  `difflib.get_close_matches(word, read_words, n=1, cutoff=0)[0]` (0.0 if there is none); the image's NED is the
  mean over its expected words (the script pools these per-word values over the whole benchmark, and Word
  Accuracy by word count: `word_ned` and the counts are in the details for that). Read words nobody expected do
  not lower either number. Case is always ignored, punctuation never is.

**lenient**: the pack's own, forgiving score (not comparable with published tables):
- Word Accuracy: the share of the expected words that occur in the text read back, each read word vouching for
  one expected word only (a multiset match: "SALE SALE" expected and "SALE" read scores 1/2).
- NED: 1 - Levenshtein(expected, read) / max(len(expected), len(read)) over the characters of the whole texts,
  so extra read text lowers it. The read text is taken in reading order; several expected texts are first put in
  the order in which each best matches the read text (the order the prompt quotes them in does not count).
- Normalisation before comparing (both sides): Unicode NFKC (full-width forms become ASCII), case folded unless
  case-sensitive, punctuation and symbols dropped, words split on white space; each Han, Hiragana, Katakana and
  Bopomofo character is one word. A read word that splits exactly into expected words counts as those words (OCR
  engines drop the space between widely set capitals: "BLUENOTEJAZZ").
- With nothing expected, Word Accuracy is 1.0, and NED is 1.0 when nothing was read either, 0.0 when anything was.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Scripts written without spaces between words: each character is one word.
_PER_CHARACTER = (
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x3FFFF),  # CJK unified ideographs extensions B..
)


def _per_character(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _PER_CHARACTER)


def _keep(ch: str) -> bool:
    """Letters, digits and combining marks are text; punctuation, symbols and spaces are not."""
    return unicodedata.category(ch)[0] in ("L", "N", "M")


def words(text: str, case_sensitive: bool = False) -> list[str]:
    """The normalised words of a text (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text or "")
    if not case_sensitive:
        text = text.casefold()
    out: list[str] = []
    for chunk in text.split():
        current = ""
        for ch in chunk:
            if _per_character(ch):
                if current:
                    out.append(current)
                    current = ""
                out.append(ch)
            elif _keep(ch):
                current += ch
        if current:
            out.append(current)
    return out


def _split_merged(token: str, vocabulary: set[str]) -> list[str] | None:
    """`token` as a run of two or more vocabulary words ("bluenotejazz" -> blue, note, jazz), else None."""
    best: list[list[str] | None] = [None] * (len(token) + 1)
    best[0] = []
    for end in range(1, len(token) + 1):
        for start in range(end):
            piece = token[start:end]
            if best[start] is not None and piece in vocabulary:
                candidate = best[start] + [piece]
                if best[end] is None or len(candidate) < len(best[end]):
                    best[end] = candidate
    found = best[-1]
    return found if found is not None and len(found) >= 2 else None


def levenshtein(a, b) -> int:
    """Insertions, deletions and substitutions (each costing 1) that turn sequence a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass
class TextScore:
    """One image's score against the expected text, with what went wrong."""

    word_accuracy: float
    ned: float  # 1 - normalised distance: CVTG-2K's NED, higher is better
    edit_distance: int
    normalised_distance: float  # edit_distance / max(len), lower is better
    expected_words: list[str]
    read_words: list[str]
    matched: list[str] = field(default_factory=list)
    misspelled: list[tuple[str, str]] = field(default_factory=list)  # (expected, closest read word)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    metric: str = "lenient"
    word_ned: list[float] = field(default_factory=list)  # cvtg-2k: each expected word's NED, as the script pools them

    def as_dict(self) -> dict:
        return {
            "metric": self.metric, "word_accuracy": self.word_accuracy, "ned": self.ned, "word_ned": self.word_ned,
            "edit_distance": self.edit_distance,
            "normalised_distance": self.normalised_distance, "expected_words": self.expected_words,
            "read_words": self.read_words, "matched": self.matched,
            "misspelled": [{"expected": e, "read": r} for e, r in self.misspelled],
            "missing": self.missing, "extra": self.extra,
        }


def _best_match_end(needle: str, haystack: str) -> int:
    """Where in `haystack` the closest approximate occurrence of `needle` ends (free start, free end)."""
    previous = [0] * (len(haystack) + 1)  # matching may start anywhere in the haystack
    for i, cn in enumerate(needle, 1):
        current = [i]
        for j, ch in enumerate(haystack, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (cn != ch)))
        previous = current
    return min(range(len(previous)), key=lambda j: (previous[j], j))


def in_image_order(spans: list[list[str]], read: str) -> list[list[str]]:
    """The expected spans (as word lists) sorted by where each best matches in the read text, so the order
    in which a prompt quotes its texts does not count as an error. Ties keep the prompt's order."""
    if len(spans) < 2 or not read:
        return spans
    ends = [_best_match_end("".join(span), read) for span in spans]
    return [spans[i] for i in sorted(range(len(spans)), key=lambda i: (ends[i], i))]


def _misspelling(word: str, candidates: list[str]) -> str | None:
    """The closest unmatched read word when it is near enough to be a misspelling of `word`."""
    best, best_d = None, None
    for c in candidates:
        d = levenshtein(word, c)
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is not None and best_d <= max(1, len(word) // 2) and best_d < max(len(word), len(best)):
        return best
    return None


METRICS = ("cvtg-2k", "lenient")


def cvtg_spans(prompt: str) -> list[str]:
    """The expected text of a prompt as CVTG-2K's script takes it: its single-quoted spans."""
    return re.findall(r"'(.*?)'", prompt)


def cvtg2k_score(expected: str | list[str], read: str | list[str]) -> TextScore:
    """One image's Word Accuracy and NED as CVTG-2K's script computes them (module docstring)."""
    if isinstance(expected, str):
        expected = [expected]
    if isinstance(read, str):
        read = [read]
    exp = [w for span in expected for w in span.lower().split()]
    got = [w for line in read for w in line.lower().split()] or [""]
    matched, misspelled, missing, word_ned, edits = [], [], [], [], 0
    for w in exp:
        if w in got:
            matched.append(w)
        best = difflib.get_close_matches(w, got, n=1, cutoff=0)
        if not best:
            word_ned.append(0.0)
            missing.append(w)
            continue
        d = levenshtein(w, best[0])
        edits += d
        word_ned.append(1 - d / (max(len(w), len(best[0])) + 1e-5))
        if best[0] != w:  # for the report: a near miss is a misspelling, anything else a missing word
            near = best[0] and d <= max(1, len(w) // 2) and d < max(len(w), len(best[0]))
            (misspelled.append((w, best[0])) if near else missing.append(w))
    ned = sum(word_ned) / len(word_ned) if word_ned else 0.0
    used = {read for _, read in misspelled}
    extra = [w for w in got if w and w not in exp and w not in used]
    return TextScore(
        word_accuracy=len(matched) / max(len(exp), 1), ned=ned, edit_distance=edits, normalised_distance=1.0 - ned,
        expected_words=exp, read_words=[w for w in got if w], matched=matched, misspelled=misspelled,
        missing=missing, extra=extra, metric="cvtg-2k", word_ned=word_ned)


def score_text(expected: str | list[str], read: str | list[str], case_sensitive: bool = False) -> TextScore:
    """The lenient Word Accuracy and NED of the read text against the expected text (strings or lists of
    spans/lines); see the module docstring."""
    if isinstance(expected, str):
        expected = [expected]
    if isinstance(read, str):
        read = [read]
    got = [w for line in read for w in words(line, case_sensitive)]
    spans = in_image_order([words(span, case_sensitive) for span in expected], "".join(got))
    exp = [w for span in spans for w in span]
    vocabulary = set(exp)
    got = [piece for w in got for piece in ((w in vocabulary and [w]) or _split_merged(w, vocabulary) or [w])]

    available = Counter(got)
    matched, unmatched = [], []
    for w in exp:
        if available[w] > 0:
            available[w] -= 1
            matched.append(w)
        else:
            unmatched.append(w)
    leftover = list(available.elements())
    leftover_in_order = []
    pool = Counter(leftover)
    for w in got:  # keep the read order for the report
        if pool[w] > 0:
            pool[w] -= 1
            leftover_in_order.append(w)

    misspelled, missing = [], []
    spare = list(leftover_in_order)
    for w in unmatched:
        near = _misspelling(w, spare)
        if near is None:
            missing.append(w)
        else:
            misspelled.append((w, near))
            spare.remove(near)

    a, b = "".join(exp), "".join(got)
    dist = levenshtein(a, b)
    longest = max(len(a), len(b))
    normalised = dist / longest if longest else 0.0
    return TextScore(
        word_accuracy=len(matched) / len(exp) if exp else 1.0,
        ned=1.0 - normalised, edit_distance=dist, normalised_distance=normalised,
        expected_words=exp, read_words=got, matched=matched, misspelled=misspelled, missing=missing,
        extra=spare,
    )


def report(scores: list[TextScore]) -> str:
    """A short readable account per image: the two numbers and which words were missed or misspelled."""
    lines = []
    for i, s in enumerate(scores):
        lines.append(f"image {i}: word accuracy {s.word_accuracy:.3f} ({len(s.matched)}/{len(s.expected_words)} words), "
                     f"NED {s.ned:.3f} ({s.metric})")
        if s.misspelled:
            lines.append("  misspelled: " + ", ".join(f"{e!r} read as {r!r}" for e, r in s.misspelled))
        if s.missing:
            lines.append("  missing: " + ", ".join(repr(w) for w in s.missing))
        if s.extra:
            lines.append("  extra: " + ", ".join(repr(w) for w in s.extra))
        if not (s.misspelled or s.missing or s.extra):
            lines.append("  all expected words found, nothing extra")
    if len(scores) > 1 and all(s.metric == "cvtg-2k" for s in scores):
        acc, ned = pooled(scores)
        lines.append(f"batch, pooled as CVTG-2K pools a benchmark: word accuracy {acc:.3f}, NED {ned:.3f}")
    return "\n".join(lines)


def pooled(scores: list[TextScore]) -> tuple[float, float]:
    """A batch's (Word Accuracy, NED) as CVTG-2K's script pools a benchmark: found words over all expected words,
    and the mean of every expected word's NED (not the mean of the images' scores)."""
    words_ = sum(len(s.expected_words) for s in scores)
    found = sum(len(s.matched) for s in scores)
    neds = [v for s in scores for v in s.word_ned]
    return found / max(words_, 1), (sum(neds) / len(neds) if neds else 0.0)


def rank(values: list[tuple[float, ...]]) -> list[int]:
    """Indices from best to worst: higher values first (compared in order), ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (tuple(-v for v in values[i]), i))
