"""Zoo matrix: LoRA and DoRA with a rank map on every head transformers has, QLoRA on every causal LM (tests/zoo.py,
tests/zoo_run.py).

Each case: one SGD step next to plain peft on the same weights (loss, every gradient, eval outputs), the
adapter's effect far above the tolerance, save, reload through hf_lorax and through plain peft in one subprocess per
class that never imports hf_lorax. QLoRA's reference is plain peft on the dequantized base (see
``zoo.QLORA_REFERENCE`` for why), and its adapter reloads through hf_lorax on a fresh 4-bit base.

One class per one or more groups of cells: ``make test`` distributes the classes over its workers (``--dist
loadscope``), and each class runs its cells in one matrix (one plain-peft subprocess, which starts torch,
transformers and peft: so two groups share a class where the class stays short).
"""

import pytest
import zoo_run


def _cases(cls) -> list:
    return [case for table in cls.TABLES for case in zoo_run.cases(table, cls.METHODS)]


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        metafunc.parametrize(("cell", "method"), _cases(metafunc.cls))


@pytest.fixture(scope="class")
def matrix(request, tmp_path_factory):
    return zoo_run.run_matrix(_cases(request.cls), tmp_path_factory.mktemp(request.cls.__name__))


class Zoo:
    TABLES: tuple[str, ...]
    METHODS: tuple[str, ...] = ("lora", "dora")

    def test_cell(self, matrix, cell, method):
        zoo_run.check_case(matrix, cell, method)


class TestDecoders(Zoo):
    """Decoders: peft's table in two halves (was TestDecodersA and TestDecodersB)."""

    TABLES = ("decoders_a", "decoders_b")


class TestEncodersAndSeq2Seq(Zoo):
    """BERT-family encoders, and T5/mT5/BART (was TestEncoders and TestSeq2Seq)."""

    TABLES = ("encoders", "seq2seq")


class TestQLoRA(Zoo):
    """4-bit NF4 base on CPU via bitsandbytes, every causal LM."""

    TABLES, METHODS = ("all",), ("qlora",)
