"""coco-caption's text normalisation without Java: a Python stand-in for the PTBTokenizer jar.

The E2E scorer tokenizes METEOR / ROUGE-L / CIDEr inputs with Stanford CoreNLP 3.4.1's PTBTokenizer
(``-preserveLines -lowerCase``) and then drops punctuation tokens; :func:`ptb_tokenize_python` reproduces
that for machines without a Java runtime (:func:`hf_lorax_paper.metrics.e2e.ptb_tokenize` picks the jar when it can).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# coco-caption drops these tokens after PTB tokenization (pycocoevalcap.tokenizer.ptbtokenizer).
# "-LRB-"/"-RRB-" never match: -lowerCase turns them into "-lrb-"/"-rrb-", which therefore stay.
COCO_PUNCTUATION = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)


def drop_punctuation(tokens: Sequence[str]) -> str:
    return " ".join(t for t in tokens if t and t not in COCO_PUNCTUATION)


_CONTRACTIONS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
}
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ll|'ve|'d|'m)$")
_ACRONYM = re.compile(r"^(?:[a-z]\.){2,}$")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof vs etc inc ltd co corp ave rd "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_OPENING = {'"': "``", "'": "`", "(": "-lrb-", "[": "-lsb-", "{": "-lcb-"}
_CLOSING = {'"': "''", "'": "'", ")": "-rrb-", "]": "-rsb-", "}": "-rcb-"}


def _split_leading(word: str) -> tuple[list[str], str]:
    """Peel opening quotes/brackets, symbols and a leading '.' or '-' (kept on a number: '-25', '.5')."""
    lead: list[str] = []
    while word:
        if word.startswith("..."):
            lead.append("...")
            word = word[3:]
        elif word[0] in _OPENING or word[0] in "$#,;:?!":
            lead.append(_OPENING.get(word[0], word[0]))
            word = word[1:]
        elif word[0] in ".-" and not (len(word) > 1 and word[1].isdigit()):
            lead.append(word[0])
            word = word[1:]
        else:
            break
    return lead, word


def _keeps_period(word: str, next_token: str | None) -> bool:
    """PTB keeps '.' on acronyms and abbreviations, and on a word right before a comma ('center.,')."""
    stem = word[:-1]
    if _ACRONYM.match(word) or stem in _ABBREVIATIONS:
        return True
    return next_token == "," and len(word) > 1 and stem[-1].isalpha()


def _split_trailing(word: str) -> tuple[str, list[str]]:
    trail: list[str] = []
    while word:
        if word.endswith("..."):
            trail.insert(0, "...")
            word = word[:-3]
        elif word[-1] in _CLOSING or word[-1] in ",;:?!-$#":
            trail.insert(0, _CLOSING.get(word[-1], word[-1]))
            word = word[:-1]
        elif word[-1] == "." and not _keeps_period(word, trail[0] if trail else None):
            trail.insert(0, ".")
            word = word[:-1]
        else:
            break
    return word, trail


def _split_clitics(word: str) -> list[str]:
    """do|n't, it|'s, he|'d|'ve: PTB splits English clitics off the stem."""
    if word in _CONTRACTIONS:
        return list(_CONTRACTIONS[word])
    tail: list[str] = []
    while (match := _CLITIC.search(word)) and match.start() > 0:
        tail.insert(0, match.group(1))
        word = word[: match.start()]
    return ([word] if word else []) + tail


def ptb_tokenize_python(text: str) -> str:
    """Pure-Python stand-in for ``ptb_tokenize_java`` on one text (used when Java is missing).

    Written against the jar's output on the E2E references: 9365 / 9365 identical after punctuation
    removal (dev + test). It also handles clitics, brackets, acronyms and common abbreviations, but not
    every PTB rule (e.g. emoticons, "y'all"), so rarely it differs on unusual text.
    """
    text = text.lower().replace("\n", " ").replace("£", " # ")  # PTB writes the pound sign as '#'
    text = re.sub(r"(?<=\w),(?=\w)", " , ", text).replace("...", " ... ")
    tokens: list[str] = []
    for chunk in text.split():
        lead, word = _split_leading(chunk)
        word, trail = _split_trailing(word)
        tokens += lead + (_split_clitics(word) if word else []) + trail
    return drop_punctuation(tokens)
