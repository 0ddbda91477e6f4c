"""GLUE: presets against the paper, metrics, original TSV layouts, end-to-end runs, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters, roberta_config
from transformers import RobertaForSequenceClassification

from hf_lorax import LoRAConfig, get_model
from hf_lorax_paper.experiment import parse
from hf_lorax_paper.experiment import run as run_experiment
from hf_lorax_paper.metrics.glue import accuracy, f1_binary, matthews_corrcoef, pearson, spearman
from hf_lorax_paper.tasks.glue import GluePlugin, load_init_adapter
from hf_lorax_paper.tasks.glue_data import TASKS, get_task, load_local, read_tsv
from hf_lorax_paper.tasks.glue_presets import PAPER_RESULTS, PRESETS, get_preset
from hf_lorax_paper.tasks.synthetic import build_tokenizer

SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"

# The copy of the LoRA paper, Table 2 and Table 9: a typo in a preset fails here.
TABLE2 = """
roberta-base         87.5 95.1 89.7 63.4 93.3 90.8 86.6 91.5
roberta-large        90.6 96.2 90.9 68.2 94.9 91.6 87.4 92.6
roberta-large-dagger 90.6 96.2 90.2 68.2 94.8 91.6 85.2 92.3
"""
ORDER = ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]
BASE = "MNLI 16/30/5e-4, SST-2 16/60/5e-4, MRPC 16/30/4e-4, CoLA 32/80/4e-4, QNLI 32/25/4e-4, QQP 16/25/5e-4, RTE 32/80/5e-4, STS-B 16/40/4e-4"
LARGE = ("MNLI 4/10/3e-4/128, SST-2 4/10/4e-4/128, MRPC 4/20/3e-4/512, CoLA 4/20/2e-4/128, QNLI 4/10/2e-4/512, "
         "QQP 4/20/3e-4/512, RTE 8/20/4e-4/512, STS-B 8/30/2e-4/512")
DAGGER = "MNLI 10/3e-4, SST-2 10/4e-4, MRPC 20/3e-4, CoLA 20/2e-4, QNLI 10/2e-4, QQP 20/3e-4, RTE 20/4e-4, STS-B 10/2e-4"


def _parse(spec):
    out = {}
    for item in spec.split(", "):
        name, values = item.split(" ")
        out[get_task(name).name] = [float(v) for v in values.split("/")]
    return out


def test_paper_results_table():
    for line in TABLE2.strip().splitlines():
        setting, *numbers = line.split()
        assert PAPER_RESULTS[setting] == dict(zip(ORDER, map(float, numbers)))


def test_presets_match_the_paper_hyperparameters():
    for task, (batch, epochs, lr) in _parse(BASE).items():
        p = PRESETS[f"roberta-base/{task}"]
        assert (p.batch_size, p.epochs, p.learning_rate, p.max_length, p.r, p.lora_alpha) == (batch, epochs, lr, 512, 8, 8)
        assert p.warmup_ratio == 0.06 and p.target_modules == ("query", "value")
        assert p.init_from_mnli == (task in ("mrpc", "rte", "stsb"))
    for task, (batch, epochs, lr, length) in _parse(LARGE).items():
        p = PRESETS[f"roberta-large/{task}"]
        assert (p.batch_size, p.epochs, p.learning_rate, p.max_length, p.r, p.lora_alpha) == (batch, epochs, lr, length, 8, 16)
    for task, (epochs, lr) in _parse(DAGGER).items():
        p = PRESETS[f"roberta-large-dagger/{task}"]
        assert (p.batch_size, p.epochs, p.learning_rate, p.max_length, p.init_from_mnli) == (4, epochs, lr, 128, False)
    official = get_preset("roberta-base/sst2", official_scripts=True)
    assert (official.lora_alpha, official.weight_decay) == (16, 0.1)


def test_metrics_match_sklearn_and_scipy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert accuracy(p, y) == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    assert f1_binary(p, y) == pytest.approx(sklearn_metrics.f1_score(y, p))
    assert matthews_corrcoef(p, y) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p))
    a, b = rng.normal(size=100), rng.integers(0, 6, 100).astype(float)  # ties for spearman
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
    assert matthews_corrcoef([1, 1], [1, 1]) == 0.0 and f1_binary([0], [0]) == 0.0


# -- fixtures in the original layouts -----------------------------------------------------------------

WORDS = "the movie was good bad great awful plot is not fine".split()


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


def write_glue(root: Path, n=24) -> Path:
    s1, s2 = _sentences(n, 1), _sentences(n, 2)
    labels = [i % 2 for i in range(n)]
    (root / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (root / "SST-2" / name).write_text("sentence\tlabel\n" + "".join(f"{a} \t{y}\n" for a, y in zip(s1, labels)))
    (root / "CoLA").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (root / "CoLA" / name).write_text("".join(f"gj04\t{y}\t\t{a}\n" for a, y in zip(s1, labels)))
    (root / "MRPC").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        rows = "".join(f'{y}\t{i}\t{i + 1}\t"{a}\t{b}"\n' for i, (a, b, y) in enumerate(zip(s1, s2, labels)))
        (root / "MRPC" / name).write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + rows, encoding="utf-8")
    (root / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for name in ("train.tsv", "dev.tsv"):
        rows = "".join(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{(i % 11) / 2:.3f}\n"
                       for i, (a, b) in enumerate(zip(s1, s2)))
        (root / "STS-B" / name).write_text(header + rows)
    (root / "RTE").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        rows = "".join(f"{a}\t{b}\t{y}\t{i}\n" for i, (a, b, y) in enumerate(zip(s1, s2, labels)))
        (root / "RTE" / name).write_text("sentence1\tsentence2\tlabel\tidx\n" + rows)
    (root / "MNLI").mkdir()
    gold = ["entailment", "neutral", "contradiction"]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        rows = "".join(f"{i}\t{a}\t{b}\t{gold[i % 3]}\n" for i, (a, b) in enumerate(zip(s1, s2)))
        (root / "MNLI" / name).write_text("index\tsentence1\tsentence2\tgold_label\n" + rows)
    return root


def write_tiny_base(path) -> str:
    """A tiny RoBERTa classifier and its tokenizer, saved to ``path``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("glue_base"))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("glue"))


def test_readers_handle_original_layouts(glue_dir):
    mrpc = read_tsv(str(glue_dir / "MRPC" / "train.tsv"), get_task("mrpc"))
    assert mrpc["sentence1"][0].startswith('"') and mrpc["label"][:2] == [0, 1]  # BOM + bare quotes
    cola = read_tsv(str(glue_dir / "CoLA" / "dev.tsv"), get_task("cola"))
    assert len(cola["sentence"]) == 24 and set(cola["label"]) == {0, 1}
    stsb = load_local(str(glue_dir), get_task("stsb"))
    assert max(stsb["validation"]["label"]) == 5.0
    mnli = load_local(str(glue_dir), get_task("mnli"))
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    assert mnli["train"]["label"][:3] == [0, 1, 2]


GLUE = GluePlugin()


def to_argv(options: dict) -> list[str]:
    """``{"num_train_epochs": 1, "use_cpu": True}`` -> ``["--num_train_epochs", "1", "--use_cpu", "true"]``."""
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _args(tiny_base, glue_dir, out, task, **kw):
    options = {"task": task, "model_name_or_path": tiny_base, "data_dir": str(glue_dir / TASKS[task].folder),
               "output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": 8, "max_length": 32,
               "rank_utilization_steps": 1, "use_cpu": True, "disable_tqdm": True, "report_to": "none", **kw}
    return to_argv(options)


def run(argv):
    return run_experiment(GLUE, parse(GLUE, argv))


def test_max_steps_0_scores_the_base_model_without_training(tiny_base, glue_dir, tmp_path):
    from safetensors.torch import load_file

    results = run(_args(tiny_base, glue_dir, tmp_path, "sst2", max_steps=0))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train_loss"] is None and saved["hyperparameters"]["max_steps"] == 0
    assert results["main_metric"]["value"] is not None
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(not t.any() for k, t in weights.items() if "lora_B" in k)  # the adapter is still the base model


@pytest.mark.parametrize(("task", "method"), [("sst2", "lora"), ("mrpc", "dora"), ("stsb", "lora"), ("mnli", "lora")])
def test_end_to_end_per_task_family(task, method, tiny_base, glue_dir, tmp_path):
    results = run(_args(tiny_base, glue_dir, tmp_path, task, method=method))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == task and saved["method"] == method
    for name in TASKS[task].metrics:
        prefix = "validation_matched_" if task == "mnli" else ""
        assert f"{prefix}{name}" in saved["metrics"], saved["metrics"]
    assert results["main_metric"]["value"] is not None
    assert "| custom/" in (tmp_path / "results.md").read_text()
    adapter = tmp_path / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "hf_lorax.json", "README.md", "results.json",
                 "rank_utilization.png"):
        assert (adapter / name).exists(), name
    assert json.loads((adapter / "hf_lorax.json").read_text())["num_labels"] == TASKS[task].num_labels


def test_init_from_mnli_adapter(tiny_base, glue_dir, tmp_path):
    run(_args(tiny_base, glue_dir, tmp_path / "mnli", "mnli"))
    results = run(_args(tiny_base, glue_dir, tmp_path / "rte", "rte", init_adapter=str(tmp_path / "mnli" / "adapter"),
                        num_train_epochs=0.01))
    assert any("classifier.out_proj" in k for k in results["init_adapter_skipped"])  # 3 labels -> 2: head re-initialised


def test_init_adapter_with_mismatched_rank(tiny_base, glue_dir, tmp_path):
    run(_args(tiny_base, glue_dir, tmp_path / "mnli", "mnli", r=4))
    out = tmp_path / "rte"
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 32\), this model's is \(8, 32\)"):
        run(_args(tiny_base, glue_dir, out, "rte", init_adapter=str(tmp_path / "mnli" / "adapter")))
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(task="sst5"), ValueError, "Unknown GLUE task 'sst5'"),
        (dict(preset="roberta-huge/sst2"), ValueError, "Unknown preset"),
        (dict(method="ia3"), ValueError, "--method 'ia3'"),
        (dict(data_dir="MISSING"), FileNotFoundError, "does not exist"),
        (dict(data_dir="MRPC"), ValueError, r"needs \['label', 'sentence'\]"),
        (dict(push_to_hub=True), ValueError, "--push_to_hub needs --hub_model_id"),
    ],
)
def test_bad_input(change, error, match, tiny_base, glue_dir, tmp_path):
    for key, value in change.items():
        if key == "data_dir":
            change[key] = str(glue_dir / value) if value != "MISSING" else str(tmp_path / "nowhere")
    argv = _args(tiny_base, glue_dir, tmp_path / "out", "sst2") + to_argv(change)  # later flags win
    with pytest.raises(error, match=match):
        run(argv)
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range(glue_dir, tmp_path):
    bad = tmp_path / "SST-2"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\nfine movie\t1\nodd movie\t2\n")
    with pytest.raises(ValueError, match=r"train.tsv: example 2 has label 2, outside 0..1 for sst2"):
        read_tsv(str(bad / "train.tsv"), get_task("sst2"))
    (bad / "train.tsv").write_text("sentence\tlabel\nfine movie\tgood\n")
    with pytest.raises(ValueError, match="has label 'good'"):
        read_tsv(str(bad / "train.tsv"), get_task("sst2"))


def test_preset_fills_defaults_and_flags_win():
    experiment = parse(GLUE, ["--preset", "roberta-large/rte", "--learning_rate", "1e-4", "--r", "4"])
    args = experiment.training
    assert (args.learning_rate, experiment.preset.r, args.per_device_train_batch_size, args.num_train_epochs) == (
        1e-4, 4, 8, 20)
    assert experiment.preset.task == "rte" and args.metric_for_best_model == "accuracy"
    assert "learning_rate" not in experiment.from_preset and "num_train_epochs" in experiment.from_preset


def test_load_init_adapter_copies_lora(tiny_roberta, tmp_path):
    a = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query"]), model=tiny_roberta)
    randomize_adapters(a)
    a.save_pretrained(tmp_path)
    b = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query"]),
                  model=RobertaForSequenceClassification(roberta_config()))
    assert load_init_adapter(b, str(tmp_path)) == []
    key = "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_B.default.weight"
    torch.testing.assert_close(b.state_dict()[key], a.state_dict()[key])


@pytest.mark.skipif(not (SHARED_GLUE / "SST-2" / "dev.tsv").exists(), reason="../shared/data/glue not present")
def test_real_glue_files(tiny_base, tmp_path):
    balance = {"SST-2": (444, 428), "CoLA": (365, 162), "MRPC": (279, 129), "RTE": (146, 131)}
    for folder, (ones_or_zeros, other) in balance.items():
        labels = read_tsv(str(SHARED_GLUE / folder / "dev.tsv"), TASKS[{"SST-2": "sst2", "CoLA": "cola", "MRPC": "mrpc",
                                                                          "RTE": "rte"}[folder]])["label"]
        assert sorted([labels.count(1), labels.count(0)], reverse=True) == sorted([ones_or_zeros, other], reverse=True)
    stsb = load_local(str(SHARED_GLUE), get_task("stsb"))
    assert len(stsb["validation"]["label"]) == 1500
    argv = to_argv({"task": "sst2", "model_name_or_path": tiny_base, "data_dir": str(SHARED_GLUE),
                    "output_dir": str(tmp_path), "num_train_epochs": 1, "per_device_train_batch_size": 16,
                    "max_train_samples": 64, "max_eval_samples": 64, "use_cpu": True, "disable_tqdm": True,
                    "report_to": "none"})
    assert run(argv)["main_metric"]["value"] is not None
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_push_to_hub_uploads_the_adapter(tiny_base, glue_dir, tmp_path, recorded_hub):
    results = run(_args(tiny_base, glue_dir, tmp_path, "sst2", push_to_hub=True, hub_model_id="me/x"))
    assert results["hub"].endswith("/commit/abc")
    uploaded = recorded_hub[0].uploaded()
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "results.json"} <= set(uploaded)
    assert not [f for f in uploaded if f.startswith("checkpoint")]
