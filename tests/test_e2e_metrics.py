"""E2E NLG metrics (hf_lorax_paper.metrics.e2e): hand-checked cases, fallbacks, the official scorer's numbers.

The golden numbers were measured by running the official e2e-metrics code (measure_scores.py's
``run_coco_eval`` + ``run_pymteval``) on the same inputs; see the module docstring for how.
"""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import pytest

from hf_lorax_paper.metrics import e2e
from hf_lorax_paper.metrics.e2e import E2EMetric, bleu, cider, e2e_scores, meteor, nist, rouge_l

E2E_DATA = Path(__file__).resolve().parents[2] / "shared/data/e2e"
HAS_COCO = e2e.coco_dir() is not None
HAS_JAVA = e2e.java_path() is not None
needs_coco = pytest.mark.skipif(
    not HAS_COCO, reason="pycocoevalcap not installed (pip install hf_lorax[e2e])"
)
needs_java = pytest.mark.skipif(not (HAS_COCO and HAS_JAVA), reason="needs Java and pycocoevalcap")

# Official scorer on testset_w_refs.csv, MRs with >= 2 references: hypothesis = the MR's first reference,
# references = the others (616 items); METEOR_40 = the first 40 of those items.
GOLDEN_TEST = {
    "BLEU": 0.6045619083952298,
    "NIST": 8.898831365878737,
    "METEOR": 0.456309311485148,
    "ROUGE_L": 0.6381129068662674,
    "CIDEr": 1.8572240685162773,
}
GOLDEN_TEST_40 = {
    "BLEU": 0.6028256517082953,
    "NIST": 7.459035835613339,
    "METEOR": 0.4598985682793279,
    "ROUGE_L": 0.6740638743940239,
    "CIDEr": 2.4144409064086103,
}

SENTENCES = [
    "the eagle is a cheap coffee shop near burger king",
    "zizzi serves italian food in the city centre at high prices",
]


def first_vs_rest(name: str = "testset_w_refs.csv") -> tuple[list[str], list[list[str]]]:
    """Group references by consecutive MR (as the scorer does); hypothesis = first ref, refs = the rest."""
    groups: list[list[str]] = []
    last = None
    with open(E2E_DATA / name, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["mr"] != last:
                groups.append([])
                last = row["mr"]
            groups[-1].append(row["ref"])
    groups = [g for g in groups if len(g) > 1]
    return [g[0] for g in groups], [g[1:] for g in groups]


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """A PATH without java, as on a machine with no JRE."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert e2e.java_path() is None


# ---------------------------------------------------------------------------------- BLEU and NIST


def test_identical_and_disjoint_bleu_nist():
    assert bleu(SENTENCES, [[s] for s in SENTENCES]) == pytest.approx(1.0)
    assert bleu(["a b c d e"], [["v w x y z"]]) == 0.0
    assert nist(["a b c d e"], [["v w x y z"]]) == 0.0


def test_bleu_clips_to_the_best_single_reference():
    """'the' is clipped at 2, its highest count in any one reference (not 1 + 2 summed over references)."""
    assert bleu(["the the the the"], [["the cat", "the the dog"]], max_order=1) == pytest.approx(2 / 4)


def test_bleu_brevity_penalty_uses_the_closest_reference():
    # hypothesis of 4 words; references of 8 and 5 words -> r = 5, BP = exp(1 - 5/4); all 1..4-grams match
    refs = [["a b c d x y z w", "a b c d q"]]
    assert bleu(["a b c d"], refs) == pytest.approx(math.exp(1 - 5 / 4))


def test_bleu_nist_are_case_insensitive_and_use_mteval_tokenization():
    assert e2e.mteval_tokenize("The Eagle, £20-25.") == ["the", "eagle", ",", "£20", "-", "25", "."]
    assert bleu([s.upper() for s in SENTENCES], [[s] for s in SENTENCES]) == pytest.approx(1.0)
    assert nist([s.title() for s in SENTENCES], [[s] for s in SENTENCES]) == pytest.approx(
        nist(SENTENCES, [[s] for s in SENTENCES])
    )


def test_nist_hand_computed():
    """Reference corpus: 'the cat sat', 'a cat', 'the dog ran' (8 words).

    info(the) = log2(8/2) = 2, info(cat) = 2, info(sat) = info(dog) = 3, every matched bigram 1, trigram 0:
    unigrams (2+2+3 + 2+3) / 5 words + bigrams (1+1 + 1) / 3 + trigram 0 / 1 = 3.4, times the length
    penalty for 5 output words against 2.5 + 3 mean reference words.
    """
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = 3.4 * math.exp(-beta * math.log(5 / 5.5) ** 2)
    assert nist(["the cat sat", "the dog"], [["the cat sat", "a cat"], ["the dog ran"]]) == pytest.approx(
        expected
    )


# ------------------------------------------------------------------------- tokenization, ROUGE, CIDEr


def test_python_ptb_tokenizer_follows_ptb_conventions():
    text = "It's £20-25 (cheap); don't miss The Eagle's 'family-friendly' city center., Mr. Smith... cannot"
    assert e2e.ptb_tokenize_python(text) == (
        "it 's # 20-25 -lrb- cheap -rrb- do n't miss the eagle 's family-friendly city center. mr. smith "
        "can not"
    )


@needs_coco
def test_rouge_l_identical_disjoint_and_best_reference():
    assert rouge_l(SENTENCES, [[s] for s in SENTENCES], backend="python") == pytest.approx(1.0)
    assert rouge_l(["a b c"], [["x y z"]], backend="python") == 0.0
    # coco-caption takes the best precision and the best recall over references separately:
    # 'a b' gives recall 1, the long reference precision 1, so F = 1.
    assert rouge_l(["a b c d"], [["a b", "a b c d e f g h"]], backend="python") == pytest.approx(1.0)


@needs_coco
def test_cider_identical_disjoint_and_single_item():
    refs = [[s] for s in SENTENCES]
    assert cider(SENTENCES, refs, backend="python") == pytest.approx(10.0)  # cosine 1 at every order, x10
    assert cider(["a b c d", "e f g h"], [["w x y z"], ["s t u v"]], backend="python") == 0.0
    assert cider(SENTENCES[:1], refs[:1], backend="python") == 0.0  # one item: every idf is log(1/1) = 0


@needs_coco
def test_case_insensitive_coco_metrics():
    upper = [s.upper() for s in SENTENCES]
    refs = [[s] for s in SENTENCES]
    assert rouge_l(upper, refs, backend="python") == pytest.approx(1.0)
    assert cider(upper, refs, backend="python") == pytest.approx(10.0)


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([], [], "empty"),
        (["a", "b"], [["a"]], "lengths differ"),
        (["a"], [[]], r"references\[0\] is an empty reference list"),
        (["a"], ["a"], r"references\[0\] must be a list"),
        ([1], [["a"]], r"predictions\[0\]"),
        (["a"], [["a", None]], r"references\[0\]\[1\]"),
        ("a", [["a"]], "predictions must be a list"),
    ],
)
def test_bad_input_is_a_clear_value_error(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        e2e_scores(predictions, references, meteor=False)
    with pytest.raises(ValueError, match=message):
        bleu(predictions, references)


# -------------------------------------------------------------------------------- fallbacks


def test_without_pycocoevalcap_bleu_and_nist_still_computed(monkeypatch):
    monkeypatch.setattr(e2e, "coco_dir", lambda: None)
    scores = e2e_scores(SENTENCES, [[s] for s in SENTENCES])
    assert scores["BLEU"] == pytest.approx(1.0) and scores["NIST"] > 0
    for name in ("METEOR", "ROUGE_L", "CIDEr"):
        assert scores[name] is None
        assert "pip install hf_lorax[e2e]" in scores["unavailable"][name]


@needs_coco
def test_without_java_meteor_unavailable_others_computed(no_java):
    scores = e2e_scores(SENTENCES, [[s] for s in SENTENCES])
    assert scores["METEOR"] is None and "java" in scores["unavailable"]["METEOR"]
    assert set(scores["unavailable"]) == {"METEOR"}
    assert scores["BLEU"] == pytest.approx(1.0) and scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0) and scores["NIST"] > 0
    with pytest.raises(e2e.MetricUnavailable, match="java"):
        meteor(SENTENCES, [[s] for s in SENTENCES])


def test_meteor_false_is_reported():
    scores = e2e_scores(SENTENCES, [[s] for s in SENTENCES], meteor=False)
    assert scores["METEOR"] is None and "meteor=False" in scores["unavailable"]["METEOR"]


def test_evaluate_metric_front_end():
    result = E2EMetric().compute(predictions=SENTENCES, references=[[s] for s in SENTENCES], meteor=False)
    assert result["BLEU"] == pytest.approx(1.0) and set(result) >= {"NIST", "ROUGE_L", "CIDEr", "unavailable"}


def test_evaluate_load_of_the_local_module_works_offline():
    """``evaluate.load(<path to e2e.py>)`` needs no Hub: the module is self-contained."""
    import evaluate

    metric = evaluate.load(e2e.__file__)
    result = metric.compute(predictions=SENTENCES, references=[[s] for s in SENTENCES], meteor=False)
    assert result["BLEU"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- Java (METEOR)


@needs_java
@pytest.mark.slow
def test_meteor_identical_is_one_and_process_is_reaped(monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(e2e.subprocess, "Popen", recording_popen)
    assert meteor(SENTENCES, [[s] for s in SENTENCES]) > 0.99
    assert started and all(p.poll() is not None for p in started)  # tokenizer and METEOR JVMs exited


@needs_java
@pytest.mark.slow
def test_meteor_disjoint_is_zero_and_protocol_characters_are_harmless():
    """'|||' and newlines would desynchronise METEOR's line protocol; they are neutralised first.

    (Untokenized, PTB would already split '|||' into '| | |'; ``tokenized=True`` feeds them as they are.)
    """
    assert meteor(["x y ||| z\nw", "p q"], [["a b c", "d ||| e"], ["r s"]], tokenized=True) == 0.0


@needs_java
def test_python_tokenizer_matches_java_on_e2e_references():
    if not E2E_DATA.is_dir():
        pytest.skip(f"{E2E_DATA} not present")
    hyps, refs = first_vs_rest()
    texts = hyps + [r for item in refs for r in item]
    java = e2e.ptb_tokenize_java(texts)
    python = [e2e.ptb_tokenize_python(t) for t in texts]
    mismatches = [(t, j, p) for t, j, p in zip(texts, java, python) if j != p]
    assert not mismatches, mismatches[:3]


# ------------------------------------------------------------------------- official scorer, real data


@pytest.mark.skipif(not E2E_DATA.is_dir(), reason="shared/data/e2e not present")
@needs_coco
@pytest.mark.parametrize("backend", ["auto", "python"])
def test_e2e_test_set_matches_official_scorer(backend):
    hyps, refs = first_vs_rest()
    assert len(hyps) == 616
    assert bleu(hyps, refs) == pytest.approx(GOLDEN_TEST["BLEU"], abs=0.01)
    assert nist(hyps, refs) == pytest.approx(GOLDEN_TEST["NIST"], abs=0.01)
    assert rouge_l(hyps, refs, backend=backend) == pytest.approx(GOLDEN_TEST["ROUGE_L"], abs=0.01)
    assert cider(hyps, refs, backend=backend) == pytest.approx(GOLDEN_TEST["CIDEr"], abs=0.01)


@pytest.mark.skipif(not E2E_DATA.is_dir(), reason="shared/data/e2e not present")
@needs_java
@pytest.mark.slow
def test_e2e_subset_all_five_match_official_scorer():
    hyps, refs = first_vs_rest()
    scores = e2e_scores(hyps[:40], refs[:40])
    assert scores["unavailable"] == {}
    for name, golden in GOLDEN_TEST_40.items():
        assert scores[name] == pytest.approx(golden, abs=0.01), name
