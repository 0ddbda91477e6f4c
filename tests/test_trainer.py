"""The standard Trainer trains, evaluates, checkpoints (adapter + head only) and resumes hf_lorax models."""

import os

import pytest
import torch
from conftest import gpt2_config, roberta_config
from datasets import Dataset
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification, Trainer, TrainingArguments

from hf_lorax import DoRAConfig, LoRAConfig, get_model


def _cls_data(n=64, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, seq), generator=g)
    labels = (ids[:, 1] > 48).long()  # learnable from one token
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _lm_data(n=32, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(out, **kw):
    defaults = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                    learning_rate=5e-3, report_to=[], use_cpu=True, seed=0, save_strategy="steps", save_steps=4,
                    logging_steps=2, disable_tqdm=True, max_steps=8, eval_strategy="steps", eval_steps=4)
    defaults.update(kw)
    return TrainingArguments(**defaults)


@pytest.fixture
def roberta_dir(tmp_path):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config()).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@pytest.mark.parametrize("cls", [LoRAConfig, DoRAConfig], ids=["lora", "dora"])
def test_train_evaluate_checkpoint_contents(cls, roberta_dir, tmp_path):
    config = cls(base_model_name_or_path=roberta_dir, task_type="SEQ_CLS", num_labels=2, r=4, lora_alpha=8,
                 target_modules=["query", "value"], rank_map={"layer.1.*": 2})
    model = get_model(config)
    head_before = model.base_model.model.classifier.modules_to_save["default"].out_proj.weight.detach().clone()
    trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=_cls_data(), eval_dataset=_cls_data(seed=1))
    result = trainer.train()
    metrics = trainer.evaluate()
    assert result.training_loss > 0 and "eval_loss" in metrics
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    head_after = model.base_model.model.classifier.modules_to_save["default"].out_proj.weight
    assert not torch.equal(head_before, head_after)  # the head trained

    checkpoint = tmp_path / "run" / "checkpoint-8"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "hf_lorax.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert all("lora_" in k or ".classifier." in k for k in saved), sorted(saved)
    assert any(".classifier." in k for k in saved)
    base_bytes = sum(p.numel() * p.element_size() for p in model.base_model.model.parameters())
    assert os.path.getsize(checkpoint / "adapter_model.safetensors") < base_bytes / 4


def test_resume_from_checkpoint_matches_uninterrupted_run(roberta_dir, tmp_path):
    def run(out, resume=None, max_steps=8):
        torch.manual_seed(0)
        config = DoRAConfig(base_model_name_or_path=roberta_dir, task_type="SEQ_CLS", num_labels=2, r=4,
                            target_modules=["query", "value"])
        model = get_model(config)
        trainer = Trainer(model=model, args=_args(out, max_steps=max_steps, eval_strategy="no"),
                          train_dataset=_cls_data())
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}

    full = run(tmp_path / "full")
    run(tmp_path / "part", max_steps=8)  # leaves checkpoint-4 and checkpoint-8
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-4"))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-6, msg=key)


def test_causal_lm_with_slices_trains(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "gpt2")
    config = LoRAConfig(base_model_name_or_path=str(tmp_path / "gpt2"), task_type="CAUSAL_LM", r=4, lora_alpha=32,
                        target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}, lora_dropout=0.1)
    model = get_model(config)
    trainer = Trainer(model=model, args=_args(tmp_path / "run", eval_strategy="no"), train_dataset=_lm_data())
    trainer.train()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    B = layer.lora_B["default"].weight.detach()
    assert B[:32, :4].abs().sum() > 0 and B[64:, 4:].abs().sum() > 0  # the q and v blocks trained from zero
    assert torch.all(B[32:64] == 0) and torch.all(B[:32, 4:] == 0) and torch.all(B[64:, :4] == 0)  # AdamW: off-block 0
    saved = load_file(tmp_path / "run" / "checkpoint-8" / "adapter_model.safetensors")
    assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 8)
    assert not [k for k in saved if ".blocks." in k or ".default." in k]  # standard peft keys only
