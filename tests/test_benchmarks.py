"""The benchmark scripts run end to end (smoke runs with tiny settings; times are not asserted).

Each script's ``main`` runs in this process (a new one would start torch, transformers and peft again just to
start the measuring processes); the configurations it measures still run in their own processes, as the script
starts them (``--worker``), on one thread each. tests/test_issue33_bench_flags.py runs a script as a real
process."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_main(tmp_path, monkeypatch):
    """``run_main(script, *args)``: ``scripts/<script>.py``'s ``main([*args, "--json", out])`` in this process, from
    ``tmp_path``, with the processes it starts on one thread (``OMP_NUM_THREADS=1``) and this process's thread count
    restored afterwards (some scripts set it); returns the JSON it wrote."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()

    def run(script: str, *args: str) -> dict:
        out = tmp_path / f"{script}.json"
        try:
            importlib.import_module(script).main([*args, "--json", str(out)])
        finally:
            torch.set_num_threads(threads)
        return json.loads(out.read_text())

    return run


def test_bench_train_measures_step_time_and_allocator_peak(run_main):
    result = run_main("bench_train", "--quick", "--models", "roberta", "--configs", "peft_dora", "hf_lorax_dora",
                      "--steps", "1", "--warmup", "1", "--threads", "1")
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"peft_dora", "hf_lorax_dora"}
    for row in rows.values():
        assert row["median_step_s"] > 0 and row["peak_bytes"] > 0 and row["peak_rss_bytes"] > 0
    # allocator bytes are deterministic (unlike times): hf_lorax's DoRA keeps fewer activations than peft's
    assert result["ratios"]["roberta"]["dora_peak_mem_hf_lorax_over_peft"] < 1.0


def test_bench_infer_reports_merged_over_base(run_main):
    result = run_main("bench_infer", "--quick", "--repeats", "1", "--seq", "4", "--threads", "1")
    assert [r["batch"] for r in result["rows"]] == [1, 32]
    assert all(r["merged_over_base"] > 0 for r in result["rows"])


def test_bench_gpu_suite_runs_its_rows_and_counts_flops(run_main):
    result = run_main("bench_gpu", "--quick", "--cpu", "--shapes", "quick-llama", "--configs", "full", "hf_lorax_lora")
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"full", "hf_lorax_lora"} and all(r["median_ms"] > 0 for r in rows.values())
    # full fine-tuning counts 6N per token, a LoRA step 4N + adapter: the same base, so full > LoRA
    assert rows["full"]["flops_per_token"] > rows["hf_lorax_lora"]["flops_per_token"] > 0
    assert rows["full"]["mfu"] is None  # no peak figure on CPU
    assert "lora_step_hf_lorax_over_full" in result["ratios"]["quick-llama/eager"]


def test_bench_counts_counts_kernels_nodes_and_syncs(run_main):
    result = run_main("bench_counts", "--quick", "--configs", "full", "peft_lora", "hf_lorax_lora", "--dropouts", "0.1")
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"full", "peft_lora", "hf_lorax_lora"} and result["dropout_route"] == "cuda"
    for row in rows.values():
        assert row["layer"]["kernel_ops"] > 0 and row["step"]["kernel_ops"] > row["layer"]["kernel_ops"]
        assert row["step"]["device_syncs"] == sum(row["step"]["sync_sources"].values())
    # the frozen linear alone: x Wᵀ + b forward; dx backward (no weight gradient): a few ops, one node
    assert rows["full"]["layer"]["autograd_nodes"] <= 2 < rows["peft_lora"]["layer"]["autograd_nodes"]
    assert set(result["loss"]) == {"transformers", "hf_lorax"} and result["loss"]["transformers"]["device_syncs"] == 0
    assert "hf_lorax_lora/peft@p=0.1 step kernel ops" in result["ratios"]


def test_op_counter_sees_syncs_by_source_and_skips_views():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_counts", ROOT / "scripts" / "bench_counts.py")
    sys.path.insert(0, str(ROOT / "scripts"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.randn(4, 3)
    counter = bench.OpCounter()
    with counter:
        y = x.view(12)  # a view: no kernel
        kept = x[x[:, 0] > 0]  # boolean-mask gather: the output size needs the device's answer
        total = float(x.sum())  # .item(): a sync
    summary = counter.summary()
    assert "view" not in summary["by_op"] and summary["by_op"]["sum"] == 1
    assert summary["device_syncs"] >= 2 and y.shape == (12,) and kept.shape[1] == 3 and total == total
    assert any(key.startswith("index @ tests/test_benchmarks.py") for key in summary["sync_sources"])


def test_bench_rank_allocation_report_joins_runs_and_judges_the_goals_on_paired_seeds(run_main, tmp_path):
    """--report_only joins per-task JSON files and states each goal from paired seeds (no training, no data)."""
    def row(task, method, budget_r, seed, score, **extra):
        return {"task": task, "metric": "accuracy", "method": method, "budget_r": budget_r, "seed": seed,
                "score": score, "params": 100 * budget_r, **extra}

    runs = {
        "a.json": [row("sst2", "uniform", 2, s, 0.70 + 0.01 * s) for s in range(3)]
        + [row("sst2", "allocated", 2, s, 0.75 + 0.01 * s, alpha_policy="scaling") for s in range(3)]
        + [row("sst2", "allocated", 2, s, 0.50, alpha_policy="alpha") for s in range(3)]  # another policy: ignored
        + [row("sst2", "allocated", 2, s, 0.78 + 0.01 * s, alpha_policy="scaling", signal="sensitivity")
           for s in range(3)],
        "b.json": [row("sst2", "adalora", 2, s, 0.76 + 0.01 * s) for s in range(3)],
    }
    for name, rows in runs.items():
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
    result = run_main("bench_rank_allocation", "--model_dir", "unused", "--report_only", "--inputs",
                      str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert len(result["rows"]) == 15
    verdicts = {v["comparison"]: v for v in result["verdicts"]}
    beats = verdicts["energy map @r=2 - uniform r=2"]
    assert all(abs(d - 5.0) < 1e-9 for d in beats["diffs"])
    assert beats["met"] and abs(beats["seed_std"] - 1.0) < 1e-9  # +5 points against a seed std of 1
    ties = verdicts["energy map @r=2 - AdaLoRA target_r=2"]
    assert abs(ties["mean_diff"] + 1.0) < 1e-9 and ties["met"]  # 1 point behind, within the seed std: a tie
    signals = verdicts["sensitivity map @r=2 - energy map @r=2"]
    assert abs(signals["mean_diff"] - 3.0) < 1e-9 and signals["met"]  # rows without "signal" are energy rows
    assert verdicts["sensitivity map @r=2 - uniform r=2"]["mean_diff"] > 7.9
