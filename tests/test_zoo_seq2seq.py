"""Zoo matrix, encoder-decoders (T5, mT5, BART): LoRA and DoRA with a rank map on every head transformers has (tests/zoo.py, tests/zoo_run.py).

Each case: one SGD step next to plain peft on the same weights (loss, every gradient, eval outputs), the
adapter's effect far above the tolerance, save, reload through hf_lorax and through plain peft in one
subprocess per file that never imports hf_lorax.
"""

import pytest
import zoo_run

CASES = zoo_run.cases("seq2seq", ("lora", "dora"))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return zoo_run.run_matrix(CASES, tmp_path_factory.mktemp("seq2seq"))


@pytest.mark.parametrize(("cell", "method"), CASES)
def test_cell(matrix, cell, method):
    zoo_run.check_case(matrix, cell, method)
