"""The five E2E NLG Challenge metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), computed locally.

The LoRA paper (Table 3) reports these on the E2E test set with the official scorer
``tuetschek/e2e-metrics`` (``measure_scores.py``); the Hub's ``evaluate.load(...)`` modules are
unreachable offline, so this module reproduces that scorer, in its units (BLEU, METEOR and ROUGE_L in
0..1, NIST around 8, CIDEr around 2.5):

* **BLEU** (4-gram) and **NIST** (5-gram): our own implementation of MT-Eval v13a (:mod:`.mteval`), corpus level,
  case-insensitive, multi-reference, with mteval's own tokenization, as the scorer's ``pymteval.py``
  (``BLEUScore`` / ``NISTScore``) computes them. Pure Python, no optional dependency.
* **METEOR 1.5**, **ROUGE-L** (beta = 1.2) and **CIDEr-D** (n = 4, sigma = 6): from ``pycocoevalcap``
  (``pip install hf_lorax[e2e]``), the coco-caption code the official scorer itself runs; METEOR is
  its Java jar (``meteor-1.5.jar -stdio -l en -norm``), driven by our own small wrapper (see
  :func:`meteor` for why). These three score text tokenized like coco-caption: Stanford PTBTokenizer
  (the ``stanford-corenlp-3.4.1.jar`` pycocoevalcap ships, ``-preserveLines -lowerCase``), then
  punctuation tokens dropped. Without Java, :func:`ptb_tokenize_python` (:mod:`.ptb`) stands in for the jar.

What is not reproduced, and why it does not matter at the ±0.01 we check:

* ``pymteval`` counts ``len(hyp) - n`` candidate n-grams, negative for a hypothesis shorter than
  ``n`` words (and it divides by zero when a whole corpus is that short); we clip at zero and skip
  empty orders, as mteval-v13a.pl does. Only outputs under 5 words can differ.
* With an n-gram order that has no match at all, ``pymteval`` smooths to about 1e-4..1e-16;
  we return exactly 0.0, as BLEU is defined.
* NIST's length penalty uses, as ``pymteval`` does, the sum over items of the mean reference length.
  The scorer's other path, Perl ``mteval-v13a-sig.pl`` (its default without ``-p``), pads the ragged
  E2E references with empty ones and uses total reference words / mean number of references, so its
  NIST differs when outputs are shorter than the references (same inputs as the table below, Perl
  vs pymteval: test first 8.9029 vs 8.8988, shuffled 3.4851 vs 3.4835, truncated 0.9715 vs 0.8079;
  its BLEU equals pymteval's to 4 decimals on all six sets). We follow ``pymteval`` because the LoRA
  repository's README scores E2E with ``measure_scores.py ... -p``, the Python path.

Verification (how, and the numbers). The official code (``measure_scores.py``'s ``run_coco_eval``
and ``run_pymteval``, ``metrics/pymteval.py`` and coco-caption's ``eval.py`` without SPICE, from a
public e2e-metrics checkout, kept outside this repository) ran with pycocoevalcap 1.2, pycocotools
2.0.11 and Java 17; this module scored the same inputs. Inputs, from ``shared/data/e2e`` with the
references grouped by MR and only MRs with at least two references kept (616 test, 547 dev):
*first* = each MR's first reference as hypothesis against the others; *shuffled* = the first
reference of another MR (``random.Random(0)`` permutation); *truncated* = the first half of the
first reference's words (exercises the brevity / length penalties). Official scorer values:

==============  ======  ======  ======  =======  ======
set             BLEU    NIST    METEOR  ROUGE_L  CIDEr
==============  ======  ======  ======  =======  ======
test first      0.6046  8.8988  0.4563  0.6381   1.8572
test shuffled   0.1570  3.4835  0.1876  0.3193   0.1650
test truncated  0.2983  0.8079  0.2470  0.4739   0.4490
dev first       0.5995  8.5785  0.4498  0.6528   1.8543
dev shuffled    0.1840  3.7204  0.2031  0.3557   0.1540
dev truncated   0.3076  0.7522  0.2560  0.4851   0.4554
==============  ======  ======  ======  =======  ======

Ours equals every one of these 30 numbers exactly (float64 difference 0.0), with the Java tokenizer
and, for ROUGE_L and CIDEr, also with the Python one. The Python tokenizer reproduces the Java
PTBTokenizer + punctuation removal on 9365 / 9365 E2E references (dev + test) and on 16 of 18
hand-written hard cases (it misses "y'all" and the emoticon ":)"). tests/test_e2e_metrics.py keeps
the "test first" numbers, and all five on its first 40 items, as golden values.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import datasets
import evaluate

# absolute imports: ``evaluate.load(<this file>)`` loads it outside the package
from hf_lorax_paper.metrics.mteval import bleu, mteval_tokenize, nist  # noqa: F401 (part of this module's API)
from hf_lorax_paper.metrics.ptb import drop_punctuation, ptb_tokenize_python
from hf_lorax_paper.metrics.references import check_inputs

INSTALL_HINT = "pip install hf_lorax[e2e]"

class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (missing Java or pycocoevalcap); the message says why."""


# --------------------------------------------------------------------------------- PTB tokenization


def java_path() -> str | None:
    """The Java runtime the coco-caption jars need, or None (METEOR then reports itself unavailable)."""
    return shutil.which("java")


def coco_dir() -> Path | None:
    """pycocoevalcap's install folder (it ships the METEOR and CoreNLP jars), or None if not installed."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require_coco() -> Path:
    folder = coco_dir()
    if folder is None:
        raise MetricUnavailable(f"pycocoevalcap is not installed ({INSTALL_HINT})")
    return folder


def ptb_tokenize_java(texts: Sequence[str], timeout: float = 300.0) -> list[str]:
    """coco-caption's tokenization: CoreNLP 3.4.1's PTBTokenizer jar, a line per text, punctuation dropped.

    Unlike pycocoevalcap's wrapper (which writes its temp file into site-packages), the input goes to
    the system temp folder, and every line break inside a text becomes a space (one stray line break
    would shift all later lines); the command line is the same.
    """
    java = java_path()
    if java is None:
        raise MetricUnavailable("java not found on PATH (the PTB tokenizer jar needs a Java runtime)")
    jar = _require_coco() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    with tempfile.TemporaryDirectory(prefix="hf_lorax_ptb_") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(" ".join(t.splitlines()) for t in texts), encoding="utf-8")
        command = [
            java,
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            str(path),
        ]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise MetricUnavailable(
            f"PTBTokenizer failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}"
        )
    lines = done.stdout.decode("utf-8", errors="replace").split("\n")
    while len(lines) > len(texts) and not lines[-1]:
        lines.pop()  # the final newline
    if len(lines) > len(texts):  # a line break we did not remove: lines no longer line up with texts
        raise MetricUnavailable(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} texts")
    lines += [""] * (len(texts) - len(lines))  # trailing empty texts may produce no line
    return [drop_punctuation(line.rstrip().split(" ")) for line in lines]


def ptb_tokenize(texts: Sequence[str], backend: str = "auto") -> list[str]:
    """coco-caption tokenization of ``texts``; backend "java", "python", or "auto" (Java when installed)."""
    if backend not in ("auto", "java", "python"):
        raise ValueError(f"backend must be 'auto', 'java' or 'python', not {backend!r}")
    if backend == "java":
        return ptb_tokenize_java(texts)
    if backend == "auto" and java_path() and coco_dir():
        try:
            return ptb_tokenize_java(texts)
        except (MetricUnavailable, OSError, subprocess.TimeoutExpired) as error:  # a broken JRE: degrade
            warnings.warn(
                f"Java PTBTokenizer failed, using the Python tokenizer instead: {error}", stacklevel=2
            )
    return [ptb_tokenize_python(t) for t in texts]


def _tokenize_corpus(predictions: list[str], references: list[list[str]], backend: str):
    """Tokenize hypotheses and references in one tokenizer run; return them in the input's shape."""
    flat = predictions + [r for refs in references for r in refs]
    tokens = ptb_tokenize(flat, backend)
    hyps, rest = tokens[: len(predictions)], iter(tokens[len(predictions) :])
    return hyps, [[next(rest) for _ in refs] for refs in references]


# ------------------------------------------------------------------------------ ROUGE-L and CIDEr


def _coco_dicts(hyps: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    return {i: list(r) for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def _prepare(predictions, references, tokenized: bool, backend: str) -> tuple[list[str], list[list[str]]]:
    predictions, references = check_inputs(predictions, references)
    if tokenized:
        return predictions, references
    return _tokenize_corpus(predictions, references, backend)


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenized: bool = False,
    backend: str = "auto",
) -> float:
    """Mean sentence ROUGE-L F (beta = 1.2), max precision and max recall over references (coco-caption)."""
    _require_coco()
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = _prepare(predictions, references, tokenized, backend)
    score, _ = Rouge().compute_score(*_coco_dicts(hyps, refs))
    return float(score)


def cider(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenized: bool = False,
    backend: str = "auto",
) -> float:
    """CIDEr-D (n = 4, sigma = 6, x10) of coco-caption; the idf comes from this corpus' references.

    Corpus-dependent by definition: with a single item every n-gram has idf 0, so the score is 0.
    """
    _require_coco()
    from pycocoevalcap.cider.cider import Cider

    hyps, refs = _prepare(predictions, references, tokenized, backend)
    if not any(r.split() for item in refs for r in item):
        return 0.0  # no reference n-gram at all: coco's scorer would fail on an empty document frequency
    score, _ = Cider(n=4, sigma=6.0).compute_score(*_coco_dicts(hyps, refs))
    return float(score)


# ------------------------------------------------------------------------------------------ METEOR


def _meteor_field(text: str) -> str:
    """Keep the '|||'-separated, line-based stdio protocol intact, as coco-caption does for hypotheses."""
    return " ".join(text.replace("|||", "").split())


class _MeteorProcess:
    """``java -jar meteor-1.5.jar - - -stdio -l en -norm``: coco-caption's command, driven robustly.

    pycocoevalcap's ``Meteor`` keeps the JVM alive until garbage collection, never reads stderr (a
    full pipe blocks the JVM), and leaves its lock held when a read fails. Here stderr is drained by a
    thread, a watchdog kills a hung JVM, and the process is always reaped on exit.
    """

    def __init__(self, timeout: float):
        java = java_path()
        if java is None:
            raise MetricUnavailable("java not found on PATH (METEOR 1.5 is a Java program)")
        folder = _require_coco() / "meteor"
        command = [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        self.proc = subprocess.Popen(
            command, cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.stderr: list[bytes] = []
        self._drain = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._drain.start()
        self._watchdog = threading.Timer(timeout, self.proc.kill)
        self._watchdog.start()

    def ask(self, line: str, n_answers: int = 1) -> list[str]:
        self.proc.stdin.write((line + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        answers = [self.proc.stdout.readline().decode("utf-8").strip() for _ in range(n_answers)]
        if not all(answers):
            tail = b"".join(self.stderr).decode(errors="replace")[-500:]
            raise MetricUnavailable(f"METEOR stopped answering (exit code {self.proc.poll()}): {tail}")
        return answers

    def close(self) -> None:
        self._watchdog.cancel()
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def __enter__(self) -> _MeteorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def meteor(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenized: bool = False,
    backend: str = "auto",
    timeout: float = 600.0,
) -> float:
    """Corpus METEOR 1.5 (coco-caption's stdio protocol): per-item SCORE stats, then one EVAL over all.

    Raises MetricUnavailable without Java or pycocoevalcap, or when the JVM fails.
    """
    hyps, refs = _prepare(predictions, references, tokenized, backend)
    try:
        with _MeteorProcess(timeout) as process:
            stats = [
                process.ask(" ||| ".join(["SCORE", *map(_meteor_field, item), _meteor_field(hyp)]))[0]
                for hyp, item in zip(hyps, refs)
            ]
            answers = process.ask(" ||| ".join(["EVAL", *stats]), n_answers=len(stats) + 1)
        return float(answers[-1])
    except (OSError, ValueError) as error:  # JVM could not start, died (broken pipe) or answered garbage
        raise MetricUnavailable(f"METEOR failed: {error!r}") from error


# ------------------------------------------------------------------------------------------ all five


def _coco_metrics(
    predictions: list[str], references: list[list[str]], with_meteor: bool
) -> tuple[dict, dict]:
    """METEOR, ROUGE_L and CIDEr on one shared PTB tokenization; failures become reasons, not errors."""
    if coco_dir() is None:
        reason = f"pycocoevalcap is not installed ({INSTALL_HINT})"
        return {"METEOR": None, "ROUGE_L": None, "CIDEr": None}, dict.fromkeys(
            ("METEOR", "ROUGE_L", "CIDEr"), reason
        )
    hyps, refs = _tokenize_corpus(predictions, references, "auto")
    scores = {
        "METEOR": None,
        "ROUGE_L": rouge_l(hyps, refs, tokenized=True),
        "CIDEr": cider(hyps, refs, tokenized=True),
    }
    if not with_meteor:
        return scores, {"METEOR": "not requested (meteor=False)"}
    try:
        scores["METEOR"] = meteor(hyps, refs, tokenized=True)
    except MetricUnavailable as error:
        return scores, {"METEOR": str(error)}
    return scores, {}


def e2e_scores(predictions: list[str], references: list[list[str]], meteor: bool = True) -> dict:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr as the official E2E scorer reports them (BLEU in 0..1, etc.).

    Returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "unavailable"}``; a metric that cannot be
    computed here is None and ``unavailable`` maps its name to the reason (empty when all five ran).
    BLEU and NIST need nothing optional; the other three need ``pycocoevalcap`` and METEOR needs Java.
    """
    predictions, references = check_inputs(predictions, references)
    coco_scores, unavailable = _coco_metrics(predictions, references, meteor)
    return {
        "BLEU": bleu(predictions, references),
        "NIST": nist(predictions, references),
        **coco_scores,
        "unavailable": unavailable,
    }


# ------------------------------------------------------------------------------------ evaluate API

_DESCRIPTION = (
    "The E2E NLG Challenge metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) as the official scorer computes them."
)
_CITATION = """@article{dusek2020e2e,
  title={Evaluating the state-of-the-art of End-to-End Natural Language Generation:
         The {E2E} {NLG} Challenge},
  author={Du{\\v{s}}ek, Ond{\\v{r}}ej and Novikova, Jekaterina and Rieser, Verena},
  journal={Computer Speech \\& Language}, volume={59}, pages={123--156}, year={2020}}"""
_INPUTS = """predictions: list of str, one output per MR. references: list of list of str, all references of
each MR. meteor (bool, default True): run METEOR (Java). Returns the dict of ``e2e_scores``."""


class E2EMetric(evaluate.Metric):
    """``evaluate`` front end: ``E2EMetric().compute(predictions=..., references=...)``, no Hub access."""

    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features(
            {
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }
        )
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS, features=features
        )

    def _compute(self, predictions, references, meteor: bool = True) -> dict:
        return e2e_scores(list(predictions), [list(r) for r in references], meteor=meteor)


__all__ = [
    "E2EMetric",
    "MetricUnavailable",
    "bleu",
    "check_inputs",
    "cider",
    "e2e_scores",
    "meteor",
    "mteval_tokenize",
    "nist",
    "ptb_tokenize",
    "ptb_tokenize_java",
    "ptb_tokenize_python",
    "rouge_l",
]
