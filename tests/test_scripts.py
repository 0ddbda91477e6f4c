"""The task scripts as users run them: TrainingArguments flags, baselines, one-line errors, curves, launchers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from scale_out import free_port
from test_glue import GLUE, TASKS, _args, run, to_argv, write_glue, write_tiny_base

from hf_lorax_paper import experiment
from hf_lorax_paper.experiment import parse

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("scripts_base"))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("scripts_glue"))


def test_standard_flags_reach_training_arguments_and_results(tiny_base, glue_dir, tmp_path):
    argv = _args(tiny_base, glue_dir, tmp_path, "sst2", max_steps=3, gradient_accumulation_steps=2,
                 learning_rate=1e-3, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                 lr_scheduler_type="constant", seed=7)
    results = run(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    args = saved["training_args"]
    assert (args["max_steps"], args["gradient_accumulation_steps"], args["learning_rate"], args["seed"]) == (3, 2, 1e-3, 7)
    assert args["lr_scheduler_type"] == "constant" and args["eval_strategy"] == "no"
    assert "learning_rate" not in saved["from_preset"] and "weight_decay" in saved["from_preset"]
    assert saved["timings_s"]["train"] > 0 and saved["timings_s"]["evaluate"] > 0
    assert results["trainable_params"] == saved["trainable_params"]
    for folder in (tmp_path, tmp_path / "adapter"):  # the curve, in the run and beside the adapter
        assert (folder / "training_curve.png").stat().st_size > 1000
    assert "![training curve](training_curve.png)" in (tmp_path / "adapter" / "README.md").read_text()
    # what ran, not the preset's values (roberta-base/sst2: 60 epochs, learning rate 5e-4)
    hyper = saved["hyperparameters"]
    assert (hyper["epochs"], hyper["learning_rate"], hyper["max_steps"], hyper["gradient_accumulation_steps"]) == (1, 1e-3, 3, 2)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| learning_rate | 0.001 |" in card and "| max_steps | 3 |" in card and "| epochs | 60" not in card


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_baselines_train_the_expected_parameters(method, tiny_base, glue_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    results = run(_args(tiny_base, glue_dir, tmp_path, "sst2", method=method, max_steps=2))
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    if method == "full":
        expected = sum(p.numel() for p in reference.parameters())
    else:  # every bias, and the classifier head
        expected = sum(p.numel() for n, p in reference.named_parameters()
                       if n.endswith(".bias") or n.startswith("classifier."))
        assert expected < sum(p.numel() for p in reference.parameters()) / 10
    assert results["trainable_params"] == expected
    assert (tmp_path / "model" / "model.safetensors").is_file() and not (tmp_path / "adapter").exists()
    table = (tmp_path / "results.md").read_text()
    assert f"| custom/sst2 | {method} |" in table


def test_baseline_rows_match_the_method():
    experiment_full = parse(GLUE, ["--preset", "roberta-base/rte", "--method", "full"])
    assert (experiment_full.training.learning_rate, experiment_full.training.num_train_epochs) == (2e-5, 10)
    from hf_lorax_paper.tasks.glue_presets import paper_result

    assert paper_result(experiment_full.preset, "full") == ("FT", 78.7)
    assert paper_result(experiment_full.preset, "bitfit") == ("BitFit", 81.5)
    assert paper_result(experiment_full.preset, "dora") == ("LoRA", 86.6)


def test_qlora_quant_storage_for_fsdp():
    from hf_lorax_paper.tasks.glue import GluePlugin

    exp = parse(GLUE, ["--preset", "roberta-base/sst2", "--method", "qlora", "--quant_storage", "bfloat16"])
    from hf_lorax import QLoRAConfig

    config = QLoRAConfig(quant_storage=exp.method.quant_storage, **GluePlugin().adapter_fields(exp.preset, exp.method, exp.data))
    assert config.bnb_config().bnb_4bit_quant_storage == torch.bfloat16


def test_help_lists_every_group_and_dashed_flags_count_as_given(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(GLUE, ["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"--{n}" in text for n in ("preset", "data_dir", "num_train_epochs", "bf16"))
    experiment = parse(GLUE, ["--preset", "roberta-base/sst2", "--num-train-epochs", "2"])
    assert experiment.training.num_train_epochs == 2 and "num_train_epochs" not in experiment.from_preset


def test_report_to_defaults_to_tensorboard_when_installed(monkeypatch):
    monkeypatch.setattr(experiment.importlib.util, "find_spec", lambda name: object() if name == "tensorboard" else None)
    assert parse(GLUE, ["--preset", "roberta-base/sst2"]).training.report_to == ["tensorboard"]
    assert parse(GLUE, ["--preset", "roberta-base/sst2", "--report_to", "none"]).training.report_to == []
    monkeypatch.setattr(experiment.importlib.util, "find_spec", lambda name: None)
    assert parse(GLUE, ["--preset", "roberta-base/sst2"]).training.report_to == []


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


def _push_main(argv):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import push_adapter
    finally:
        sys.path.pop(0)
    return push_adapter.main(argv)


@pytest.mark.parametrize(
    ("task", "args", "message"),
    [
        ("glue", ["--preset", "roberta-huge/sst2"], "Unknown preset 'roberta-huge/sst2'"),
        ("glue", ["--preset", "roberta-base/sst2", "--num_train_epochs", "abc"], "num_train_epochs"),
        ("glue", ["--preset", "roberta-base/sst2", "--bogus_flag", "1"], "--bogus_flag"),
        ("glue", ["--task", "sst2", "--model_name_or_path", "x", "--data_dir", "/nowhere"], "does not exist"),
        ("e2e", ["--preset", "gpt2-xl/e2e"], "Unknown E2E preset 'gpt2-xl/e2e'"),
        ("e2e", ["--train_file", "/nowhere.csv", "--test_file", "/nowhere.csv"], "nowhere.csv"),
        ("push", ["/nowhere", "--repo_id", "me/x"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(task, args, message, tmp_path, capsys):
    from hf_lorax_paper.tasks.e2e import E2EPlugin

    if task == "push":
        code = _push_main(args)
    else:
        code = experiment.main(GLUE if task == "glue" else E2EPlugin(), [*args, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_real_script_process_shows_the_traceback_with_debug():
    """Without ``--debug`` the same process exits 2 with one ``error:`` line and no traceback: asserted, exactly one
    line on stderr and nothing on stdout, by tests/test_cli.py::test_commands_print_one_line_despite_third_party_chatter
    (``run_glue.py --preset roberta-huge/sst2``)."""
    proc = _script("run_glue.py", "--preset", "roberta-huge/sst2", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def _accelerate_launch(config: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / config), "--main_process_port", str(free_port()),
           str(ROOT / "scripts" / "run_glue.py"), *argv]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), ENV.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize(("config", "engine", "method"), [
    ("ddp_cpu.yaml", "MULTI_CPU", "lora"),
    ("deepspeed_zero3_cpu.yaml", "DEEPSPEED", "dora"),  # the base loads partitioned; DoRA's norm gathers it
])
def test_cpu_launcher_configs_start_what_they_say(config, engine, method, tiny_base, glue_dir, tmp_path):
    """Each CPU launcher config, as documented: two processes in one group under the named engine; one process
    writes the run, the adapter is whole (a ZeRO-3 save gathers it), the rank-utilization report is written."""
    if engine == "DEEPSPEED":
        pytest.importorskip("deepspeed", reason="deepspeed is in the test extras")
    proc = _accelerate_launch(config, _args(tiny_base, glue_dir, tmp_path, "sst2", method=method, max_steps=2,
                                                  per_device_train_batch_size=4, rank_utilization_steps=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| preset | method |") == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["distributed"] == {"processes": 2, "engine": engine}
    assert saved["task"] == "sst2" and saved["method"] == method
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any("lora_magnitude_vector" in k for k in weights) == (method == "dora")
    assert json.loads((tmp_path / "rank_utilization.json").read_text())["modules"]
    assert not [n for n in os.listdir(tmp_path) if ".hf_lorax-tmp-" in n]


def test_processes_that_would_train_alone_are_refused(tiny_base, glue_dir, tmp_path):
    """Two launched processes that do not join one group would each train and write the same files: the script
    exits 2 with one line saying why, before training (torchrun then stops the other process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "scripts" / "run_glue.py"), *_args(tiny_base, glue_dir, tmp_path, "sst2"), "--use_cpu", "false"]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # the first process to stop ends the launch
    assert "error: 2 processes were launched, but each would train alone" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr.split("error: 2 processes")[0]  # torchrun's own report comes after it
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(("name", "launcher", "processes"), [("fsdp.yaml", "use_fsdp", 8),
                                                              ("deepspeed_zero3.yaml", "use_deepspeed", 8)])
def test_gpu_launcher_configs_are_valid_for_accelerate(name, launcher, processes):
    """Dry check (they need GPUs): accelerate loads each file, picks the multi-process launcher of the named
    engine with the stated process count, and every plugin key is an option ``accelerate launch`` takes (a
    misspelt key would otherwise be ignored)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ROOT / "examples" / "accelerate" / name
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert config.num_processes == raw["num_processes"] and str(config.distributed_type).endswith(raw["distributed_type"])
    options = {action.dest for action in launch_command_parser()._actions}
    section = raw["fsdp_config" if name == "fsdp.yaml" else "deepspeed_config"]
    assert set(section) <= options, set(section) - options
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert getattr(args, launcher) and not args.cpu and args.num_processes == processes
    if name == "fsdp.yaml":  # Trainer.save_model writes the whole adapter only from a full state dict
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_every_shipped_launcher_config_has_a_test():
    tested = {"ddp_cpu.yaml", "deepspeed_zero3_cpu.yaml", "fsdp.yaml", "deepspeed_zero3.yaml"}
    assert {p.name for p in (ROOT / "examples" / "accelerate").glob("*.yaml")} == tested


def test_glue_argv_helper_matches_the_task_table():
    assert to_argv({"use_cpu": True, "r": None}) == ["--use_cpu", "true"] and "sst2" in TASKS
