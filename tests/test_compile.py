"""``torch.compile(model, fullgraph=True)`` of a training step: no graph break, no recompilation after step 1.

``aot_eager`` traces forward *and* backward through AOTAutograd (custom autograd functions included) without
inductor's code generation, which needs a C++ toolchain and minutes of CPU time; graph breaks and
recompiles are decided by dynamo before the backend runs, so they are the same as with inductor.
"""

import copy

import pytest
import torch
from conftest import gpt2_config, randomize_adapters
from transformers import GPT2LMHeadModel

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, get_model

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
CASES = {
    "lora": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, lora_dropout=0.1),
    "lora-rank-map-slices": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS,
                                               fused_slices={"c_attn": ["q", "v"]}, rank_map={"h.1.*": 8}),
    "dora-slices": lambda: DoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, lora_dropout=0.1,
                                      fused_slices={"c_attn": ["q", "v"]}),
    "qlora": lambda: QLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, compute_dtype="float32"),
    "qdora": lambda: QLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS, compute_dtype="float32",
                                 use_dora=True),
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_embd=64)).save_pretrained(path)
    return str(path)


def _steps(model, batch: dict, steps: int = 3, settle: int = 1) -> list[float]:
    """Compiled training steps; fullgraph raises on any graph break, and a recompile after ``settle`` steps fails."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        with torch._dynamo.config.patch(error_on_recompile=step >= settle):
            loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_compile_whole_and_match_eager(case, gpt2_dir):
    config = CASES[case]()
    if isinstance(config, QLoRAConfig):
        config.base_model_name_or_path = gpt2_dir
        eager, model = get_model(copy.deepcopy(config)), get_model(config)
    else:
        base = GPT2LMHeadModel.from_pretrained(gpt2_dir)
        eager, model = get_model(config, model=copy.deepcopy(base)), get_model(config, model=base)
    for m in (eager, model):
        randomize_adapters(m, seed=1)
        m.train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    torch._dynamo.reset()
    torch.manual_seed(3)
    compiled_losses = _steps(model, batch)  # raises on a graph break (fullgraph) or a recompile after step 1
    torch.manual_seed(3)
    optimizer = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=1e-3)
    eager_losses = []
    for _ in range(3):
        loss = eager(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        eager_losses.append(float(loss))
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)


def test_classification_dora_compiles_whole(tiny_roberta):
    """transformers' classification heads set ``config.problem_type`` on their first labelled forward, which
    recompiles once (transformers' behaviour, for peft's LoRA as well); from then on the graph is stable."""
    model = get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"]),
                      model=copy.deepcopy(tiny_roberta))
    randomize_adapters(model)
    model.train()
    torch._dynamo.reset()
    batch = {"input_ids": torch.randint(3, 96, (2, 8)), "labels": torch.tensor([0, 1])}
    assert len(_steps(model, batch, steps=3, settle=2)) == 3


def test_label_smoothed_logits_free_loss_compiles_whole_and_matches_eager():
    """TargetedLossTrainer's training loss (the logits-free loss with label smoothing) under torch.compile: masked
    positions weigh 0 instead of being gathered out (no data-dependent shape), so it traces whole. Same loss and grads."""
    from hf_lorax.loss import set_label_smoothing

    torch.manual_seed(0)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=GPT2_TARGETS),
                      model=GPT2LMHeadModel(gpt2_config()))
    randomize_adapters(model, seed=1)
    set_label_smoothing(model, 0.1)
    eager = copy.deepcopy(model)
    for m in (model, eager):  # training mode (the logits-free path) without GPT-2's own dropout
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step >= 1):
            out = compiled(input_ids=ids, labels=labels)
        out.loss.backward()
    reference = eager(input_ids=ids, labels=labels).loss
    reference.backward()
    assert out.logits is None
    assert float(out.loss) == pytest.approx(float(reference), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.requires_grad:  # two compiled backward passes, one eager
            torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-4, atol=1e-6, msg=name)
