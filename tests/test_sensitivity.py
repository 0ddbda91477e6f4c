"""Loss sensitivity of update directions: the maths against autograd, and a student recovering a teacher's ranks."""

import json

import pytest
import torch
from torch import nn

from hf_lorax import LoRAConfig, get_model
from hf_lorax.analysis.allocation import adapter_params, allocate, spectra_from_updates
from hf_lorax.analysis.report import LowRankUpdate, updates_from_model
from hf_lorax.analysis.sensitivity import SensitivityTracker, direction_sensitivity


def _update_and_grads(A, B, scaling, W, x, target):
    """Loss of ``x (W + s·B A)ᵀ`` against ``target``; returns (|σ_k u_kᵀ G v_k| from autograd's G, the factors' grads)."""
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    delta = (scaling * B @ A).detach().requires_grad_()
    loss = ((x @ (W + delta).T - target) ** 2).mean()
    (G,) = torch.autograd.grad(loss, delta)
    u, sigma, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
    r = A.shape[0]
    expected = (sigma[:r] * (u[:, :r].T @ G.double() @ vh[:r].T).diagonal()).abs()
    loss_f = ((x @ (W + scaling * B @ A).T - target) ** 2).mean()
    grad_A, grad_B = torch.autograd.grad(loss_f, (A, B))
    return expected, grad_A, grad_B


def test_direction_sensitivity_equals_projection_of_the_full_gradient_and_ignores_the_factor_split():
    torch.manual_seed(0)
    out, inp, r, s = 12, 9, 4, 0.5
    A, B, W = torch.randn(r, inp), torch.randn(out, r), torch.randn(out, inp)
    x, target = torch.randn(32, inp), torch.randn(32, out)
    expected, gA, gB = _update_and_grads(A, B, s, W, x, target)
    got = direction_sensitivity(LowRankUpdate("m", "", A, B, s), gA, gB)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    mix = torch.randn(r, r) + 3 * torch.eye(r)  # the same product, split differently: B M, M⁻¹ A
    A2, B2 = torch.linalg.solve(mix, A), B @ mix
    _, gA2, gB2 = _update_and_grads(A2, B2, s, W, x, target)
    assert torch.allclose(direction_sensitivity(LowRankUpdate("m", "", A2, B2, s), gA2, gB2), expected,
                          rtol=1e-3, atol=1e-6)
    assert torch.equal(direction_sensitivity(LowRankUpdate("m", "", A, torch.zeros_like(B), s), gA, gB),
                       torch.zeros(r, dtype=torch.float64))  # B = 0 (a fresh adapter): nothing to lose


class Blocks(nn.Module):
    """Independent linear maps, one per input block, so each module's update is identifiable."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))

    def forward(self, x):
        return torch.stack([block(x[:, i]) for i, block in enumerate(self.blocks)], dim=1)


TEACHER_RANKS = {"blocks.0": 4, "blocks.1": 2, "blocks.2": 1, "blocks.3": 1}
D = 16


def _teacher(base: Blocks) -> Blocks:
    """The base plus, per module, a rank-``TEACHER_RANKS[m]`` update of singular values 1.5."""
    g = torch.Generator().manual_seed(1)
    teacher = Blocks(len(TEACHER_RANKS), D)
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for i, rank in enumerate(TEACHER_RANKS.values()):
            q_out, _ = torch.linalg.qr(torch.randn(D, rank, generator=g))
            q_in, _ = torch.linalg.qr(torch.randn(D, rank, generator=g))
            teacher.blocks[i].weight += 1.5 * q_out @ q_in.T
    return teacher.requires_grad_(False)


def _train(model, teacher, steps, tracker=None, seed=0):
    """Adam on noisy teacher outputs; returns the mean squared error to the clean teacher on held-out inputs."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(steps):
        x = torch.randn(64, len(TEACHER_RANKS), D, generator=g)
        target = teacher(x) + 0.1 * torch.randn(64, len(TEACHER_RANKS), D, generator=g)
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        if tracker is not None:
            tracker.update(model)
        optimizer.step()
        optimizer.zero_grad()
    x = torch.randn(512, len(TEACHER_RANKS), D, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(((model(x) - teacher(x)) ** 2).mean())


def _student(base: Blocks, **kwargs):
    torch.manual_seed(0)
    model = Blocks(len(TEACHER_RANKS), D)
    model.load_state_dict(base.state_dict())
    config = LoRAConfig(target_modules=list(TEACHER_RANKS), lora_dropout=0.0, init_lora_weights=True, **kwargs)
    return get_model(config, model)


def test_sensitivity_allocation_recovers_a_teachers_ranks_and_beats_uniform_at_equal_parameters():
    torch.manual_seed(0)
    base = Blocks(len(TEACHER_RANKS), D)
    teacher = _teacher(base)
    probe, tracker = _student(base, r=8, lora_alpha=16), SensitivityTracker()
    _train(probe, teacher, steps=60, tracker=tracker)
    spectra = spectra_from_updates(updates_from_model(probe), tracker.scores())
    budget = adapter_params(spectra, dict.fromkeys(TEACHER_RANKS, 2))  # uniform r=2: 8 ranks of 32 parameters
    plan = allocate(spectra, budget, lora_alpha=4, signal="sensitivity")
    assert plan.rank_map == TEACHER_RANKS
    assert plan.params == budget and plan.to_json()["signal"] == "sensitivity"

    allocated = _train(_student(base, r=1, lora_alpha=2, rank_map=plan.rank_map, alpha_map=plan.alpha_map),
                       teacher, steps=300)
    uniform = _train(_student(base, r=2, lora_alpha=4), teacher, steps=300)
    assert allocated < 0.1 * uniform, (allocated, uniform)  # uniform r=2 cannot hold blocks.0's four directions


def test_tracker_smooths_with_uncertainty_and_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta1=1"):
        SensitivityTracker(beta1=1)
    base = Blocks(len(TEACHER_RANKS), D)
    model, tracker = _student(base, r=2, lora_alpha=4), SensitivityTracker(beta1=0.5, beta2=0.5)
    tracker.update(model)  # no gradients yet: nothing recorded
    assert tracker.steps == 0 and tracker.scores() == {}
    _train(model, _teacher(base), steps=3, tracker=tracker)
    scores = tracker.scores()
    assert tracker.steps == 3 and sorted(scores) == sorted(TEACHER_RANKS)
    assert all(len(v) == 2 and min(v) >= 0 for v in scores.values())
    assert json.loads(json.dumps(tracker.to_json()))["scores"] == scores


def test_energy_signal_unchanged_and_missing_sensitivity_is_named():
    spectra = spectra_from_updates([LowRankUpdate("m", "", torch.randn(2, 4), torch.randn(4, 2), 1.0)])
    assert allocate(spectra, 16, lora_alpha=2).to_json()["signal"] == "energy"
    with pytest.raises(ValueError, match="m: no loss sensitivity was recorded"):
        allocate(spectra, 16, lora_alpha=2, signal="sensitivity")
    with pytest.raises(ValueError, match=r"signal 'loss': choose one of \['energy', 'sensitivity'\]"):
        allocate(spectra, 16, lora_alpha=2, signal="loss")


def test_callback_records_sensitivity_and_the_cli_allocates_by_it(tmp_path, capsys):
    from conftest import build_gpt2
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_lorax.analysis import RankUtilizationCallback
    from hf_lorax.analysis.__main__ import main as cli

    torch.manual_seed(0)
    model = get_model(LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                 fused_slices={"c_attn": ["q", "v"]}), build_gpt2())
    ids = torch.randint(0, 96, (32, 8), generator=torch.Generator().manual_seed(0)).tolist()
    run = tmp_path / "run"
    args = TrainingArguments(output_dir=str(run), max_steps=5, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    RankUtilizationCallback(every_n_steps=5, plot=False).attach(trainer)
    trainer.train()
    trainer.save_model(str(run))
    recorded = json.loads((run / "rank_utilization.json").read_text())["sensitivity"]
    assert recorded["steps"] == 5 and "transformer.h.0.attn.c_attn[q]" in recorded["scores"]
    assert len(recorded["scores"]) == 2 * 4 and all(len(v) == 4 for v in recorded["scores"].values())

    assert cli([str(run), "--budget_ratio", "0.5", "--signal", "sensitivity"]) == 0
    suggestion = json.loads((run / "suggested_rank_map.json").read_text())
    assert suggestion["signal"] == "sensitivity" and suggestion["params"] <= suggestion["budget"]
    assert sorted(suggestion["rank_map"]) == sorted(f"transformer.h.{i}.{m}" for i in (0, 1)
                                                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj"))

    (run / "rank_utilization.json").unlink()
    capsys.readouterr()
    assert cli([str(run), "--budget_ratio", "0.5", "--signal", "sensitivity"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank_utilization.json holds no loss sensitivity" in err[0] and "--signal energy" in err[0]


def test_a_run_whose_gradients_were_never_visible_says_so(tmp_path, caplog):
    from hf_lorax.analysis import RankUtilizationCallback

    callback = RankUtilizationCallback(plot=False)
    callback.measure(_student(Blocks(len(TEACHER_RANKS), D), r=2, lora_alpha=4), step=1)  # no optimizer step seen
    with caplog.at_level("WARNING"):
        callback.write(str(tmp_path))
    assert "no loss sensitivity was recorded" in caplog.text
    assert "sensitivity" not in json.loads((tmp_path / "rank_utilization.json").read_text())
