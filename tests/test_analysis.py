"""Rank-utilization analysis: analytic cases, the Trainer callback, the suggested map and the CLI."""

import json

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from datasets import Dataset
from peft import get_peft_model
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification, Trainer, TrainingArguments

from hf_lorax import DoRAConfig, LoRAConfig, RankUtilizationCallback, get_model
from hf_lorax.analysis import (
    analyze,
    effective_rank,
    energy,
    energy_rank,
    factor_singular_values,
    stable_rank,
    subspace_similarity,
    suggest_rank_map,
    updates_from_adapter_dir,
    updates_from_model,
)
from hf_lorax.analysis.__main__ import main as cli


def _rank_k_factors(k, r=8, d_out=40, d_in=30, seed=0):
    """A, B with B A = c · Q_out[:, :k] Q_in[:, :k]ᵀ: k equal non-zero singular values."""
    g = torch.Generator().manual_seed(seed)
    q_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))[0]
    q_in = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    B = torch.zeros(d_out, r)
    B[:, :k] = 3.0 * q_out[:, :k]
    A = torch.randn(r, d_in, generator=g)
    A[:k] = q_in[:, :k].T
    return A, B


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_rank_k(k):
    A, B = _rank_k_factors(k)
    sv = factor_singular_values(A, B, scaling=0.5)
    assert effective_rank(sv) == pytest.approx(k, abs=0.05)
    assert stable_rank(sv) == pytest.approx(k, abs=1e-4)
    assert energy(sv)[k - 1] == pytest.approx(1.0)
    assert energy_rank(sv, 0.9) <= k and energy_rank(sv, 0.999) == k


def test_factor_singular_values_equal_dense_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 50, generator=g), torch.randn(70, 6, generator=g)
    expected = torch.linalg.svdvals(0.7 * B @ A)
    torch.testing.assert_close(factor_singular_values(A, B, 0.7).float(), expected[:6], atol=1e-5, rtol=1e-5)


def test_zero_update_is_zero_utilization():
    sv = factor_singular_values(torch.randn(4, 10), torch.zeros(12, 4))
    assert effective_rank(sv) == 0 and stable_rank(sv) == 0 and energy_rank(sv) == 0


def test_subspace_similarity_extremes():
    q = torch.linalg.qr(torch.randn(20, 20))[0]
    A1, A2 = q[:, :4].T, q[:, 4:8].T
    assert subspace_similarity(A1, A2) == pytest.approx(0.0, abs=1e-10)
    assert subspace_similarity(A1, 5.0 * A1) == pytest.approx(1.0)
    assert subspace_similarity(A1, torch.cat([A1, A2]), 4, 8) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        subspace_similarity(A1, A2, 5, 1)


def test_dora_and_slices_are_analysed(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, DoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                 fused_slices={"c_attn": ["q", "v"]}))
    randomize_adapters(model)
    stats = analyze(updates_from_model(model))
    names = [s.name for s in stats]
    assert "transformer.h.0.attn.c_attn[q]" in names and "transformer.h.0.attn.c_attn[v]" in names
    assert all(s.magnitude is not None and "rel_change_mean" in s.magnitude for s in stats)
    assert all(s.relative_norm > 0 for s in stats)
    q = next(s for s in stats if s.name == "transformer.h.0.attn.c_attn[q]")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    A = layer.lora_A["default"].weight[:4]
    B = layer.lora_B["default"].weight[:32, :4]  # the q block of the dense block-structured B
    dense = torch.linalg.svdvals(layer.scaling["default"] * B @ A)[:4]
    torch.testing.assert_close(torch.tensor(q.singular_values).float(), dense, atol=1e-5, rtol=1e-5)


def test_suggested_map_is_power_of_two_and_loads(tiny_gpt2, tmp_path):
    model = get_peft_model(tiny_gpt2, LoRAConfig(r=8, target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    A, B = _rank_k_factors(3, r=8, d_out=96, d_in=32)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    suggestion = suggest_rank_map(analyze(updates_from_model(model)), threshold=0.99)
    assert suggestion == {"transformer.h.0.attn.c_attn": 1, "transformer.h.1.attn.c_attn": 4}
    (tmp_path / "s.json").write_text(json.dumps({"rank_map": suggestion}))
    config = LoRAConfig(r=8, target_modules=["c_attn"], rank_map=str(tmp_path / "s.json"))
    again = get_peft_model(GPT2LMHeadModel(gpt2_config()), config)
    assert again.base_model.model.transformer.h[1].attn.c_attn.r["default"] == 4


def test_callback_in_a_trainer_run(tmp_path):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config()).save_pretrained(tmp_path / "base")
    model = get_model(DoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=2,
                                 r=4, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (48, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] > 48).long().tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100, save_strategy="no",
                             disable_tqdm=True)
    callback = RankUtilizationCallback(every_n_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "rank_utilization/mean" in e]
    assert [e["step"] for e in logged] == [2, 4, 6]
    assert all(0 < e["rank_utilization/mean"] <= 1 for e in logged)
    assert "rank_utilization/type/query/min" in logged[0] and "rank_utilization/layer/1/mean" in logged[0]
    assert "rank_utilization/module/roberta.encoder.layer.0.attention.self.query" in logged[0]
    report = json.loads((tmp_path / "run" / "rank_utilization.json").read_text())
    assert [h["step"] for h in report["history"]] == [2, 4, 6] and len(report["modules"]) == 4
    png = (tmp_path / "run" / "rank_utilization.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    suggestion = tmp_path / "run" / "suggested_rank_map.json"
    assert set(json.loads(suggestion.read_text())["rank_map"]) == {
        f"roberta.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")}
    LoRAConfig(target_modules=["query", "value"], rank_map=str(suggestion))


def test_cli_on_saved_adapters(tmp_path, capsys):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")
    dirs = []
    for seed in (0, 1):
        model = get_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="CAUSAL_LM", r=4,
                                     target_modules=["c_attn", "c_proj"], fused_slices={"c_attn": ["q", "v"]}))
        randomize_adapters(model, seed=seed)
        model.save_pretrained(tmp_path / f"a{seed}")
        dirs.append(str(tmp_path / f"a{seed}"))
    assert cli([dirs[0], "--base_model", str(tmp_path / "base"), "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn[q]" in out
    # the LoRA paper's subspace similarity (§7.2) of two saved adapters, from Python
    first, second = ({u.name: u.lora_A for u in updates_from_adapter_dir(d)} for d in dirs)
    assert 0 <= subspace_similarity(first["transformer.h.0.attn.c_proj"], second["transformer.h.0.attn.c_proj"]) <= 1
    report = json.loads((tmp_path / "out" / "rank_utilization.json").read_text())
    assert all(m["relative_norm"] > 0 for m in report["modules"])
    assert len(report["modules"]) == 2 * 4  # per layer: c_attn[q], c_attn[v], attn.c_proj, mlp.c_proj
    assert (tmp_path / "out" / "rank_utilization.png").exists()
