"""Issue 33: the benchmark scripts check their numbers as the training scripts do (hf_lorax_paper.arguments):
one ``error:`` line naming the flag and its range, exit code 2, before any model is built."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WHOLE, WHOLE0 = "a whole number >= 1", "a whole number >= 0"
NOT_A_NUMBER = None  # argparse's own message: "argument --flag: invalid int value: 'x'"

BAD = [
    ("bench_callback", ["--steps", "0"], "steps", WHOLE),
    ("bench_callback", ["--repeats", "-1"], "repeats", WHOLE),
    ("bench_callback", ["--every", "0"], "every", WHOLE),
    ("bench_callback", ["--threads", "two"], "threads", NOT_A_NUMBER),
    ("bench_counts", ["--dropouts", "0.1", "1.5"], "dropouts", "a number in [0, 1)"),
    ("bench_counts", ["--dropouts", "x"], "dropouts", NOT_A_NUMBER),
    ("bench_e2e", ["--batch", "0"], "batch", WHOLE),
    ("bench_e2e", ["--steps", "-3"], "steps", WHOLE),
    ("bench_e2e", ["--warmup", "-1"], "warmup", WHOLE0),
    ("bench_e2e", ["--repeats", "1.5"], "repeats", NOT_A_NUMBER),
    ("bench_glue", ["--batch_size", "0"], "batch_size", WHOLE),
    ("bench_glue", ["--train_samples", "-1"], "train_samples", WHOLE),
    ("bench_glue", ["--layers", "four"], "layers", NOT_A_NUMBER),
    ("bench_gpu", ["--steps", "0"], "steps", WHOLE),
    ("bench_gpu", ["--repeats", "-1"], "repeats", WHOLE),
    ("bench_gpu", ["--peak_tflops", "-5"], "peak_tflops", "a finite number > 0"),
    ("bench_gpu", ["--warmup", "x"], "warmup", NOT_A_NUMBER),
    ("bench_infer", ["--repeats", "0"], "repeats", WHOLE),
    ("bench_infer", ["--seq", "-1"], "seq", WHOLE),
    ("bench_infer", ["--threads", "x"], "threads", NOT_A_NUMBER),
    ("bench_rank_allocation", ["--model_dir", "m", "--batch_size", "0"], "batch_size", WHOLE),
    ("bench_rank_allocation", ["--model_dir", "m", "--seeds", "0", "-1"], "seeds", WHOLE0),
    ("bench_rank_allocation", ["--model_dir", "m", "--learning_rate", "nan"], "learning_rate", "a finite number > 0"),
    ("bench_rank_allocation", ["--model_dir", "m", "--budgets", "x"], "budgets", NOT_A_NUMBER),
    ("bench_train", ["--steps", "0"], "steps", WHOLE),
    ("bench_train", ["--repeats", "-2"], "repeats", WHOLE),
    ("bench_train", ["--dropout", "1.0"], "dropout", "a number in [0, 1)"),
    ("bench_train", ["--warmup", "x"], "warmup", NOT_A_NUMBER),
]


@pytest.mark.parametrize(("script", "argv", "flag", "rule"), BAD, ids=[f"{b[0]}:{' '.join(b[1])}" for b in BAD])
def test_bad_numbers_are_one_line_naming_the_flag_and_exit_2(script, argv, flag, rule, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    if rule is NOT_A_NUMBER:
        assert lines[0].startswith(f"error: argument --{flag}: invalid "), lines[0]
    else:
        assert lines[0].startswith(f"error: --{flag} ") and lines[0].endswith(f"must be {rule}."), lines[0]


def test_the_real_process_prints_one_line_and_no_traceback():
    bad = subprocess.run([sys.executable, str(SCRIPTS / "bench_infer.py"), "--repeats", "0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr == "error: --repeats 0: must be a whole number >= 1.\n", bad.stderr
