"""Zoo matrix, QLoRA (4-bit NF4 base on CPU via bitsandbytes) with a rank map on every causal LM (tests/zoo.py, tests/zoo_run.py).

The reference is plain peft on the dequantized base (see ``zoo.QLORA_REFERENCE`` for why); the saved adapter
is reloaded through hf_lorax on a fresh 4-bit base and through plain peft in a subprocess.
"""

import pytest
import zoo_run

CASES = zoo_run.cases("all", ("qlora",))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return zoo_run.run_matrix(CASES, tmp_path_factory.mktemp("qlora"))


@pytest.mark.parametrize(("cell", "method"), CASES)
def test_cell(matrix, cell, method):
    zoo_run.check_case(matrix, cell, method)
