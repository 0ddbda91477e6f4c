"""Zoo matrix: LoRA and DoRA with a rank map on every head transformers has, QLoRA on every causal LM (tests/zoo.py,
tests/zoo_run.py).

Each case: one SGD step next to plain peft on the same weights (loss, every gradient, eval outputs), the
adapter's effect far above the tolerance, save, reload through hf_lorax and through plain peft in one subprocess per
group that never imports hf_lorax. QLoRA's reference is plain peft on the dequantized base (see
``zoo.QLORA_REFERENCE`` for why), and its adapter reloads through hf_lorax on a fresh 4-bit base.

One class per group of cells: ``make test`` distributes the classes over its workers (``--dist loadscope``), and
each class runs its cells in one matrix (one plain-peft subprocess).
"""

import pytest
import zoo_run


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        metafunc.parametrize(("cell", "method"), zoo_run.cases(metafunc.cls.TABLE, metafunc.cls.METHODS))


@pytest.fixture(scope="class")
def matrix(request, tmp_path_factory):
    cls = request.cls
    return zoo_run.run_matrix(zoo_run.cases(cls.TABLE, cls.METHODS), tmp_path_factory.mktemp(cls.__name__))


class Zoo:
    TABLE: str
    METHODS: tuple[str, ...] = ("lora", "dora")

    def test_cell(self, matrix, cell, method):
        zoo_run.check_case(matrix, cell, method)


class TestDecodersA(Zoo):
    """Decoders, first half of peft's table."""

    TABLE = "decoders_a"


class TestDecodersB(Zoo):
    """Decoders, second half of peft's table."""

    TABLE = "decoders_b"


class TestEncoders(Zoo):
    """BERT-family encoders."""

    TABLE = "encoders"


class TestSeq2Seq(Zoo):
    TABLE = "seq2seq"


class TestQLoRA(Zoo):
    """4-bit NF4 base on CPU via bitsandbytes, every causal LM."""

    TABLE, METHODS = "all", ("qlora",)
