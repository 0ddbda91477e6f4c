"""Corpus BLEU and NIST as MT-Eval v13a computes them (case-insensitive, multi-reference).

Our own implementation of what the official E2E scorer runs (``pymteval.py``, equal to the Perl
``mteval-v13a.pl`` for BLEU); :mod:`hf_lorax_paper.metrics.e2e` documents how it was checked against it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from .references import check_inputs

# mteval-v13a splits off these ASCII symbols everywhere ('.', ',' and '-' have their own rules below).
_MTEVAL_SYMBOLS = re.compile("([" + re.escape('{|}~[\\]^_`!"#$%&()*+:;<=>?@/') + "])")
_MTEVAL_RULES = (
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period / comma not preceded by a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period / comma not followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash preceded by a digit
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def mteval_tokenize(text: str) -> list[str]:
    """MT-Eval v13a's default ("western") tokenization, lowercased because the scorer is case-insensitive."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _ENTITIES:
        text = text.replace(entity, char)
    text = _MTEVAL_SYMBOLS.sub(r" \1 ", f" {text} ")
    for pattern, replacement in _MTEVAL_RULES:
        text = pattern.sub(replacement, text)
    return text.lower().split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: list[list[str]], n: int) -> Counter:
    """Clipping counts: each n-gram's highest count in any single reference."""
    merged: Counter = Counter()
    for ref in refs:
        merged |= _ngrams(ref, n)
    return merged


def _clipped_hits(hyp: list[str], refs: list[list[str]], n: int) -> Counter:
    return _ngrams(hyp, n) & _max_ref_counts(refs, n)


def _tokenized_pairs(predictions, references) -> list[tuple[list[str], list[list[str]]]]:
    predictions, references = check_inputs(predictions, references)
    return [
        (mteval_tokenize(h), [mteval_tokenize(r) for r in refs]) for h, refs in zip(predictions, references)
    ]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU as mteval-v13a / pymteval: clipped n-gram precision, closest-reference brevity penalty.

    The reference length of an item is the one closest to the hypothesis length (the shorter on a tie).
    """
    hits, totals, hyp_len, ref_len = [0] * max_order, [0] * max_order, 0, 0
    for hyp, refs in _tokenized_pairs(predictions, references):
        for n in range(1, max_order + 1):
            hits[n - 1] += sum(_clipped_hits(hyp, refs, n).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    if min(hits) == 0:
        return 0.0
    log_precision = sum(math.log(h / t) for h, t in zip(hits, totals)) / max_order
    brevity = math.exp(min(0.0, 1.0 - ref_len / hyp_len))
    return brevity * math.exp(log_precision)


# mteval-v13a: the penalty is 0.5 when the output is 2/3 of the reference length.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def _nist_information(pairs: list[tuple[list[str], list[list[str]]]], max_order: int) -> dict[tuple, float]:
    """info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)), counted over every reference of the corpus."""
    counts: Counter = Counter()
    for _, refs in pairs:
        for ref in refs:
            counts[()] += len(ref)
            for n in range(1, max_order + 1):
                counts.update(_ngrams(ref, n))
    return {g: math.log2(counts[g[:-1]] / c) for g, c in counts.items() if g}


def nist_length_penalty(hyp_len: int, avg_ref_len: float) -> float:
    """exp(-beta * log(ratio)^2) for outputs shorter than the references, 1 otherwise."""
    ratio = hyp_len / avg_ref_len if avg_ref_len else 1.0
    if ratio >= 1:
        return 1.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2) if ratio > 0 else 0.0


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 5) -> float:
    """Corpus NIST as pymteval: information-weighted clipped matches, averaged per order, summed over 1..5."""
    pairs = _tokenized_pairs(predictions, references)
    info = _nist_information(pairs, max_order)
    gained, totals = [0.0] * max_order, [0] * max_order
    for hyp, refs in pairs:
        for n in range(1, max_order + 1):
            gained[n - 1] += sum(info[g] * c for g, c in _clipped_hits(hyp, refs, n).items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    score = sum(g / t for g, t in zip(gained, totals) if t)
    avg_ref_len = sum(sum(map(len, refs)) / len(refs) for _, refs in pairs)
    return score * nist_length_penalty(totals[0], avg_ref_len)
