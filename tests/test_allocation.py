"""Budgeted rank allocation on synthetic spectra, the CLI's budget mode, and the round trip through get_model."""

import json
import math

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification

from hf_lorax import LoRAConfig, get_model
from hf_lorax.analysis.__main__ import main as cli
from hf_lorax.analysis.allocation import (
    ModuleSpectrum,
    adapter_params,
    allocate,
    allocate_ranks,
    direction_order,
    spectra_from_updates,
)
from hf_lorax.analysis.report import updates_from_model


def _spectrum(name, decay, cost=64, r=8, scaling=2.0):
    return ModuleSpectrum(name, (tuple(decay**k for k in range(r)),), cost, r, scaling)


SPECTRA = [_spectrum("a", 0.9), _spectrum("b", 0.5), _spectrum("c", 0.2), _spectrum("d", 0.7, cost=128)]


def _lora_count(model) -> int:
    """LoRA entries that train: a fused-slice B (a dense matrix, zero off its blocks) counts its blocks only."""
    from hf_lorax.layers.sliced import trained_numel

    return sum(trained_numel(m) for n, m in model.named_modules() if n.split(".")[-2:-1] in (["lora_A"], ["lora_B"]))


@pytest.mark.parametrize("budget", [320, 500, 777, 1000, 2048, 2560])
def test_budget_met_and_next_direction_does_not_fit(budget):
    ranks = allocate_ranks(SPECTRA, budget)
    used = adapter_params(SPECTRA, ranks)
    assert used <= budget
    taken = sum(ranks.values()) - len(ranks)
    rest = direction_order(SPECTRA)[taken:]
    assert not rest or used + rest[0][2] > budget  # the prefix is the longest that fits
    assert all(1 <= ranks[s.module] <= s.probe_rank for s in SPECTRA)


def test_monotone_in_budget():
    previous = allocate_ranks(SPECTRA, 320)
    for budget in range(320, 2600, 37):
        ranks = allocate_ranks(SPECTRA, budget)
        assert all(ranks[m] >= previous[m] for m in ranks), budget
        previous = ranks
    assert previous == {s.module: s.probe_rank for s in SPECTRA}  # the probe's own size: every rank, capped


def test_flatter_spectrum_gets_more_rank_and_larger_module_fewer():
    ranks = allocate_ranks(SPECTRA[:3], 3 * 64 * 4)
    assert ranks["a"] > ranks["b"] > ranks["c"] >= 1
    same = [_spectrum("small", 0.8, cost=64), _spectrum("large", 0.8, cost=128)]
    ranks = allocate_ranks(same, 64 * 4 + 128 * 4)
    assert ranks["small"] > ranks["large"]


def test_zero_update_keeps_rank_one_and_order_follows_sigma():
    spectra = [ModuleSpectrum("zero", ((0.0,) * 4,), 10, 4), _spectrum("live", 0.9, cost=10, r=4)]
    assert allocate_ranks(spectra, 10 * 5) == {"zero": 1, "live": 4}
    order = [k for m, k, _ in direction_order(SPECTRA) if m == "a"]
    assert order == sorted(order)


def test_budget_below_minimum_names_the_minimum():
    with pytest.raises(ValueError, match=r"below the minimum 320 .*4 adapted modules"):
        allocate_ranks(SPECTRA, 319)


def test_alpha_policies():
    plan = allocate(SPECTRA, 1000, lora_alpha=16, alpha_policy="scaling")
    assert all(plan.alpha_map[m] / r == pytest.approx(2.0) for m, r in plan.rank_map.items())
    assert allocate(SPECTRA, 1000, lora_alpha=16, alpha_policy="alpha").alpha_map is None
    rs = allocate(SPECTRA, 1000, lora_alpha=16, alpha_policy="rslora")
    assert all(rs.alpha_map[m] / r == pytest.approx(16 / math.sqrt(r)) for m, r in rs.rank_map.items())
    with pytest.raises(ValueError, match="choose one of"):
        allocate(SPECTRA, 1000, lora_alpha=16, alpha_policy="nope")


def _probe(**fields):
    model = get_model(LoRAConfig(**fields))
    randomize_adapters(model, seed=0)
    return model


def test_round_trip_roberta(tmp_path):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(num_labels=2)).save_pretrained(tmp_path / "base")
    common = dict(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=2,
                  target_modules=["query", "value", "dense"])
    probe = _probe(r=8, lora_alpha=16, **common)
    spectra = spectra_from_updates(updates_from_model(probe))
    assert len({s.cost_per_rank for s in spectra}) > 1  # attention and MLP dense layers differ in size
    plan = allocate(spectra, budget=_lora_count(probe) // 4, lora_alpha=16)
    model = get_model(LoRAConfig(r=1, lora_alpha=16, rank_map=plan.rank_map, alpha_map=plan.alpha_map, **common))
    assert _lora_count(model) == plan.params <= plan.budget
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            module = name.removeprefix("base_model.model.")
            assert layer.lora_A["default"].weight.shape[0] == plan.rank_map[module]
            assert layer.scaling["default"] == pytest.approx(2.0)  # "scaling": the probe's alpha / r


def test_round_trip_fused_slices(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")
    common = dict(base_model_name_or_path=str(tmp_path / "base"), task_type="CAUSAL_LM",
                  target_modules=["c_attn", "c_fc"], fused_slices={"c_attn": ["q", "v"]})
    probe = _probe(r=4, lora_alpha=8, **common)
    spectra = spectra_from_updates(updates_from_model(probe))
    assert {len(s.singular_values) for s in spectra} == {1, 2}
    plan = allocate(spectra, budget=_lora_count(probe) // 2, lora_alpha=8)
    model = get_model(LoRAConfig(r=1, lora_alpha=8, rank_map=plan.rank_map, alpha_map=plan.alpha_map, **common))
    assert _lora_count(model) == plan.params


def test_cli_budget(tmp_path, capsys):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(num_labels=2)).save_pretrained(tmp_path / "base")
    probe = _probe(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=2,
                   r=8, lora_alpha=8, target_modules=["query", "value"])
    probe.save_pretrained(tmp_path / "probe")
    total = _lora_count(probe)
    assert cli([str(tmp_path / "probe"), "--budget_ratio", "0.25", "--output_dir", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "suggested_rank_map.json").read_text())
    assert saved["params"] <= total // 4 and saved["alpha_policy"] == "scaling"
    assert set(saved["rank_map"]) == set(saved["alpha_map"])
    assert cli([str(tmp_path / "probe"), "--budget", "10"]) == 2
    assert "below the minimum" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli([str(tmp_path / "probe"), "--budget", "10", "--budget_ratio", "0.5"])
    assert exit_info.value.code == 2
    assert cli([str(tmp_path / "probe"), "--budget_ratio", "2"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
