"""Every number a task script takes is checked before anything runs: one line naming the flag and its range."""

import math

import pytest
from test_glue import GLUE, TASKS, write_glue

from hf_lorax_paper import experiment
from hf_lorax_paper.arguments import check_values, ran_hyperparameters
from hf_lorax_paper.tasks.e2e import E2EPlugin
from hf_lorax_paper.tasks.e2e_data import E2ESplit, limit_mrs, read_csv
from hf_lorax_paper.tasks.e2e_presets import get_preset as e2e_preset
from hf_lorax_paper.tasks.glue_data import read_tsv

BAD = [
    ("num_train_epochs", "-1", "a finite number > 0"),
    ("num_train_epochs", "0", "a finite number > 0"),
    ("max_steps", "-5", "-1 (train --num_train_epochs), 0 (no training: score the model as it starts) or a whole number >= 1"),
    ("per_device_train_batch_size", "0", "a whole number >= 1"),
    ("per_device_eval_batch_size", "-1", "a whole number >= 1"),
    ("gradient_accumulation_steps", "0", "a whole number >= 1"),
    ("learning_rate", "-0.001", "a finite number > 0"),
    ("learning_rate", "nan", "a finite number > 0"),
    ("weight_decay", "-0.1", "a finite number >= 0"),
    ("label_smoothing_factor", "1.5", "a number in [0, 1)"),
    ("max_grad_norm", "-1", "a finite number >= 0"),
    ("seed", "-1", "a whole number >= 0"),
    ("max_train_samples", "0", "a whole number >= 1"),
    ("max_train_samples", "-1", "a whole number >= 1"),
    ("max_eval_samples", "0", "a whole number >= 1"),
    ("r", "0", "a whole number >= 1"),
    ("lora_alpha", "-8", "a finite number > 0"),
    ("lora_alpha", "inf", "a finite number > 0"),
    ("lora_dropout", "1.0", "a number in [0, 1)"),
    ("rank_utilization_steps", "0", "a whole number >= 1"),
    ("max_length", "0", "a whole number >= 1"),
]


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("flag", "value", "rule"), BAD)
def test_glue_numbers_out_of_range_are_one_line_naming_the_flag(flag, value, rule, tmp_path, capsys):
    code = experiment.main(GLUE, ["--preset", "roberta-base/sst2", f"--{flag}", value, "--output_dir", str(tmp_path / "o")])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith(f"error: --{flag} ") and line.endswith(f"must be {rule}."), line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flag", "value", "rule"), [
    ("num_train_epochs", "-1", "a finite number > 0"), ("max_train_samples", "-1", "a whole number >= 1"),
    ("num_beams", "0", "a whole number >= 1"), ("max_new_tokens", "0", "a whole number >= 1"),
    ("no_repeat_ngram_size", "-1", "a whole number >= 0"), ("length_penalty", "nan", "a finite number"),
    ("r", "-4", "a whole number >= 1"), ("lora_dropout", "-0.1", "a number in [0, 1)"),
])
def test_e2e_numbers_out_of_range_are_one_line_naming_the_flag(flag, value, rule, tmp_path, capsys):
    code = experiment.main(E2EPlugin(), [f"--{flag}", value, "--output_dir", str(tmp_path / "o")])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith(f"error: --{flag} ") and line.endswith(f"must be {rule}."), line


def test_epochs_are_not_checked_when_max_steps_replaces_them():
    parsed = experiment.parse(GLUE, ["--preset", "roberta-base/sst2", "--num_train_epochs", "0", "--max_steps", "3"])
    assert parsed.training.max_steps == 3


def test_readers_take_exactly_the_rows_asked_for(tmp_path):
    folder = write_glue(tmp_path) / TASKS["sst2"].folder
    assert len(read_tsv(str(folder / "train.tsv"), TASKS["sst2"], 2)["label"]) == 2
    assert len(read_tsv(str(folder / "train.tsv"), TASKS["sst2"], 1)["label"]) == 1
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"max_rows={bad!r} must be None \(every row\) or a whole number >= 1"):
            read_tsv(str(folder / "train.tsv"), TASKS["sst2"], bad)
    csv = tmp_path / "e2e.csv"
    csv.write_text("mr,ref\n" + "".join(f'"name[A{i}], food[Thai]",A{i} serves Thai.\n' for i in range(4)))
    assert len(read_csv(str(csv), 3).mrs) == 3
    with pytest.raises(ValueError, match="max_rows=0"):
        read_csv(str(csv), 0)
    with pytest.raises(ValueError, match="max_mrs=-1"):
        limit_mrs(E2ESplit(["name[A]"], ["A."], "x"), -1)


def test_recorded_hyperparameters_are_the_ones_that_ran():
    class Args:
        num_train_epochs, learning_rate, per_device_train_batch_size, weight_decay = 1.0, 1e-3, 4, 0.0
        warmup_steps, label_smoothing_factor, max_steps, gradient_accumulation_steps = 0, 0.0, 7, 2

    from hf_lorax_paper.tasks.e2e import TRAINING_FIELDS

    preset = e2e_preset("gpt2-medium/e2e")
    values = ran_hyperparameters(preset, Args, TRAINING_FIELDS)
    assert (values["epochs"], values["learning_rate"], values["batch_size"], values["label_smoothing"]) == (1.0, 1e-3, 4, 0.0)
    assert values["max_steps"] == 7 and values["gradient_accumulation_steps"] == 2 and values["r"] == preset.r
    assert preset.epochs == 5  # the preset itself is unchanged


def test_check_values_rejects_bools_and_non_finite():
    from hf_lorax_paper.arguments import METHOD_RULES

    for value in (True, math.nan, "8"):
        with pytest.raises(ValueError, match="--r "):
            check_values({"r": value}, METHOD_RULES)
    check_values({"r": None, "lora_alpha": 16.0}, METHOD_RULES)
