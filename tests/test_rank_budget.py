"""``--rank_map auto``: the probe run, the budgeted map in the real run, results.json and the model card."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_glue import GLUE, _args, run, write_glue, write_tiny_base

from hf_lorax import card as card_module
from hf_lorax.card import _allocation_part
from hf_lorax_paper import experiment


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_budget")
    return write_tiny_base(root / "base"), write_glue(root / "glue")


@pytest.mark.parametrize("signal", ["energy", "sensitivity"])
def test_auto_rank_map_end_to_end(setup, tmp_path, monkeypatch, signal):
    base, glue = setup
    # this checkout's card template (a dev venv's editable install may map hf_lorax.model_cards to another one)
    templates = Path(__file__).resolve().parents[1] / "model_cards"
    monkeypatch.setattr(card_module, "resources", SimpleNamespace(files=lambda package: templates))
    results = run(_args(base, glue, tmp_path, "sst2", rank_map="auto", rank_budget_ratio=0.25, probe_steps=2,
                        probe_r=8, alpha_policy="scaling", r=4, lora_alpha=16, signal=signal))
    saved = json.loads((tmp_path / "results.json").read_text())
    allocation = saved["rank_allocation"]
    assert allocation == results["rank_allocation"]
    assert allocation["probe_steps"] == 2 and allocation["probe_r"] == 8 and allocation["alpha_policy"] == "scaling"
    assert allocation["params"] <= allocation["budget"] and allocation["signal"] == signal
    # the probe trained at the run's scaling 16/4 (lora_alpha 32 at r=8), which "scaling" keeps in every module
    assert allocation["alpha_map"] == {m: pytest.approx(4.0 * r) for m, r in allocation["rank_map"].items()}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    ranks = {**{m: config["r"] for m in allocation["rank_map"]}, **config.get("rank_pattern", {})}
    assert ranks == allocation["rank_map"]  # the saved adapter has exactly the allocated ranks
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for k, t in weights.items() if "lora_" in k) == allocation["params"]
    part = _allocation_part(allocation)
    assert f"{allocation['params']:,}" in part and "r=8, 2 steps" in part
    assert ("loss sensitivity" if signal == "sensitivity" else "update's energy") in part
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "## Rank allocation" in card and part in card


@pytest.mark.parametrize(("extra", "message"), [
    (dict(rank_budget=1000), "--rank_budget needs --rank_map auto"),
    (dict(rank_map="auto", probe_steps=2), "exactly one of --rank_budget"),
    (dict(rank_map="auto", rank_budget=1000), "needs --probe_steps"),
    (dict(rank_map="auto", rank_budget=10, probe_steps=1), "below the minimum"),
    (dict(rank_map="auto", rank_budget=1000, probe_steps=1, alpha_policy="x"), "alpha policy 'x'"),
    (dict(rank_map="auto", rank_budget=1000, probe_steps=1, method="full"), "trains no adapter"),
    (dict(signal="sensitivity"), "--signal needs --rank_map auto"),
    (dict(rank_map="auto", rank_budget=1000, probe_steps=1, signal="loss"), "--signal 'loss': choose one of"),
])
def test_bad_flags_one_line_exit_2(setup, tmp_path, capsys, extra, message):
    base, glue = setup
    code = experiment.main(GLUE, _args(base, glue, tmp_path, "sst2", **extra))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "results.json").exists()
