"""Text Accuracy's cvtg-2k metric against the published definition (CVTG-2K's evaluation script, TextCrafter's
`unified_metrics_eval.py`): expected values are worked by hand, and an independent implementation of the formula
written here (standard library only, not the pack's code) is checked on those cases first, then compared with the
node on many random cases."""

from __future__ import annotations

import difflib
import random
import re

import pytest

from letterpress.nodes.text_check import LetterpressTextAccuracy


def edits(a: str, b: str) -> int:
    """Levenshtein distance, the textbook table."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def published(prompt: str, lines: list[str]) -> tuple[float, float]:
    """(Word Accuracy, NED) of one image as the script defines them."""
    expected = [w for span in re.findall(r"'(.*?)'", prompt) for w in span.lower().split()]
    read = [w for line in lines for w in line.lower().split()] or [""]
    found = sum(w in read for w in expected)
    neds = []
    for w in expected:
        best = difflib.get_close_matches(w, read, n=1, cutoff=0)
        neds.append(1 - edits(w, best[0]) / (max(len(w), len(best[0])) + 1e-5) if best else 0.0)
    return found / max(len(expected), 1), (sum(neds) / len(neds) if neds else 0.0)


# (prompt, read lines, Word Accuracy, NED), worked by hand
HAND = [
    # one letter wrong in a three-word sign: (1 + 1 + (1 - 1/5)) / 3 (the joined-string NED would be 1 - 1/13)
    ("a sign that says 'HELLO BIG WORLD'", ["HELLO BIG WORLT"], 2 / 3, (2 + (1 - 1 / 5.00001)) / 3),
    # extra read words change nothing
    ("a door sign 'OPEN'", ["OPEN", "NOW 24 HOURS"], 1.0, 1.0),
    # a repeated expected word found once counts twice
    ("a banner 'SALE SALE'", ["SALE"], 1.0, 1.0),
    # punctuation is part of the word: 'hello!' is not 'hello', and is one edit from it
    ("a card 'HELLO'", ["HELLO!"], 0.0, 1 - 1 / 6.00001),
    # nothing read: the closest word is the empty string
    ("a card 'HELLO'", [], 0.0, 1 - 5 / 5.00001),
    # case never matters; two quoted spans are one list of words
    ("'Fresh Coffee' and 'open daily'", ["OPEN DAILY", "fresh coffee"], 1.0, 1.0),
    # a missing word with others present: its closest read word is still scored
    ("'RED FOX'", ["RED"], 1 / 2, (1 + (1 - 3 / 3.00001)) / 2),
]


@pytest.mark.parametrize("prompt,lines,acc,ned", HAND)
def test_the_reference_formula_gives_the_hand_worked_values(prompt, lines, acc, ned):
    got_acc, got_ned = published(prompt, lines)
    assert got_acc == pytest.approx(acc, abs=1e-12) and got_ned == pytest.approx(ned, abs=1e-12)


def accuracy(prompt, lines, metric=None, expected_text=""):
    read = [{"engine": "test", "lines": [{"text": t, "score": 1.0, "box": []} for t in lines]}]
    args = (read, prompt, expected_text, False) + ((metric,) if metric else ())
    scores, report, _ = LetterpressTextAccuracy().run(*args)
    return scores["values"][0], scores, report


@pytest.mark.parametrize("prompt,lines,acc,ned", HAND)
def test_the_node_default_is_cvtg_2k_and_gives_the_hand_worked_values(prompt, lines, acc, ned):
    (got_acc, got_ned), scores, report = accuracy(prompt, lines)
    assert scores["metric"] == "cvtg-2k" and "metric: cvtg-2k" in report
    assert got_acc == pytest.approx(acc, abs=1e-12) and got_ned == pytest.approx(ned, abs=1e-12)


def test_the_node_equals_the_published_formula_on_random_cases():
    rng = random.Random(0)
    vocab = ["open", "OPEN", "sale", "Sale!", "coffee", "cofee", "daily", "24h", "x", "naïve", "über", "blue-note"]
    for _ in range(300):
        spans = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        prompt = "a poster with " + " and ".join(f"'{s}'" for s in spans)
        lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 3))]
        (acc, ned), _, _ = accuracy(prompt, lines)
        ref_acc, ref_ned = published(prompt, lines)
        assert acc == pytest.approx(ref_acc, abs=1e-12) and ned == pytest.approx(ref_ned, abs=1e-12), (prompt, lines)


def test_lenient_is_the_packs_own_score_and_differs_where_the_issue_says():
    prompt = "a sign that says 'HELLO BIG WORLD'"
    assert accuracy(prompt, ["HELLO BIG WORLT"], "lenient")[0][1] == pytest.approx(1 - 1 / 13)
    assert accuracy("'OPEN'", ["OPEN NOW"], "lenient")[0][1] < 1.0  # extra read text lowers the joined NED
    assert accuracy("'SALE SALE'", ["SALE"], "lenient")[0][0] == 0.5  # each read word vouches for one
    assert accuracy("'HELLO'", ["HELLO!"], "lenient")[0] == [1.0, 1.0]  # punctuation dropped


def test_cvtg_takes_the_single_quoted_spans_and_other_quotes_only_without_them():
    (acc, _), scores, _ = accuracy('a sign \'OPEN\' over a door "CLOSED"', ["OPEN"])
    assert scores["expected"] == ["OPEN"] and acc == 1.0
    (_, _), scores, _ = accuracy('a sign that reads "HELLO WORLD"', ["HELLO WORLD"])
    assert scores["expected"] == ["HELLO WORLD"]  # no single quotes: the pack's quoted spans
    (acc, _), scores, _ = accuracy("'IGNORED'", ["typed text"], expected_text="typed text")
    assert scores["expected"] == ["typed text"] and acc == 1.0


def test_a_batch_is_pooled_by_words_as_the_script_pools_a_benchmark():
    lines = [["HELLO BIG WORLD"], ["HELLO"]]  # 3 of 3 and 1 of 3 words found: 4/6
    read = [{"engine": "test", "lines": [{"text": t, "score": 1.0, "box": []} for t in image]} for image in lines]
    _, report, _ = LetterpressTextAccuracy().run(read, "'HELLO BIG WORLD'", "", False)
    per_word = [published("'HELLO BIG WORLD'", image) for image in lines]
    assert per_word[0] == (1.0, 1.0)
    # pooled NED: the mean over all six expected words (3 of image 0, 3 of image 1), worked from the formula
    # image 1 reads only 'hello': big -> hello is 5 edits (3 substitutions, 2 insertions), world -> hello 4 substitutions
    neds = [1, 1, 1] + [1, 1 - 5 / 5.00001, 1 - 4 / 5.00001]
    assert f"word accuracy {4 / 6:.3f}, NED {sum(neds) / 6:.3f}" in report
