"""hf_lorax configs under TRL's SFTTrainer and DPOTrainer (``peft_config=...``), against plain peft in the same runs."""

import dataclasses

import pytest
import torch
from conftest import gpt2_config
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, resolve
from hf_lorax.layers import SlicedLoraB

trl = pytest.importorskip("trl")  # in the test extras (pyproject.toml)

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(60)]


def _tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _sentence(rng, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (n,), generator=rng))


def _base():
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(vocab_size=len(WORDS), pad_token_id=0, eos_token_id=1, bos_token_id=1))


def _plain(config, model) -> LoraConfig:
    """The plain peft config hf_lorax's resolved copy is: what peft would hold."""
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    resolved = config.with_plan(resolve(config, model)).to_dict()
    return LoraConfig(**{k: v for k, v in resolved.items() if k in fields})


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _sft(tmp_path, peft_config):
    rng = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"text": [_sentence(rng, 10) for _ in range(8)]})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", max_length=16, seed=0, learning_rate=0.1,
                         optim="sgd",  # AdamW's first steps amplify float-rounding differences to ±lr
                         bf16=False)  # TRL's default on a bf16-capable CPU: fp32 keeps the 1e-5 comparison meaningful
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(model=_base(), args=args, train_dataset=data, processing_class=_tokenizer(),
                             peft_config=peft_config)
    trainer.train()
    return trainer


@pytest.mark.parametrize("make", [
    lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                       rank_map={"h.1.*": 2}, alpha_map={"c_proj": 2}),
    lambda: DoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], rank_map={"h.0.*": 8}),
], ids=["lora-maps", "dora-maps"])
def test_sft_trainer_trains_as_plain_peft(make, tmp_path):
    ours = _sft(tmp_path / "ours", make())
    reference = _sft(tmp_path / "plain", _plain(make(), _base()))
    assert type(reference.model.peft_config["default"]) is LoraConfig
    torch.testing.assert_close(torch.tensor(_losses(ours)), torch.tensor(_losses(reference)), atol=1e-5, rtol=1e-5)
    theirs = dict(reference.model.named_parameters())
    for name, p in ours.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=1e-5, msg=name)
    layer = ours.model.base_model.model.transformer.h[1].attn.c_attn
    assert layer.r["default"] == (2 if "lora" in type(ours.model.peft_config["default"]).__name__.lower() else 4)


def test_sft_trainer_refuses_qlora_config_on_an_unquantized_model(tmp_path):
    with pytest.raises(ValueError, match="QLoRAConfig needs a quantized base"):
        _sft(tmp_path, QLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))


def test_dpo_trainer_with_fused_slices(tmp_path):
    rng = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"prompt": [_sentence(rng, 4) for _ in range(4)],
                              "chosen": [" " + _sentence(rng, 3) for _ in range(4)],
                              "rejected": [" " + _sentence(rng, 3) for _ in range(4)]})
    config = LoRAConfig(task_type="CAUSAL_LM", r=2, lora_alpha=8, target_modules=["c_attn"],
                        fused_slices={"c_attn": ["q", "v"]})

    def run(peft_config, out):
        args = trl.DPOConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, learning_rate=1e-2,
                             max_length=16, bf16=False)  # fp32 on every CPU (TRL picks bf16 where the CPU has it)
        torch.manual_seed(0)
        trainer = trl.DPOTrainer(model=_base(), args=args, train_dataset=data, processing_class=_tokenizer(),
                                 peft_config=peft_config)
        trainer.train()
        return trainer

    ours = run(config, tmp_path / "ours")
    reference = run(_plain(config, _base()), tmp_path / "plain")
    # step 1 starts from B = 0 in both: the same loss; then plain peft also trains the k slice
    assert _losses(ours)[0] == pytest.approx(_losses(reference)[0], abs=1e-5)
    sliced = [m for m in ours.model.modules() if isinstance(m, SlicedLoraB)]
    assert len(sliced) == 2
    for module in sliced:
        assert torch.all(module.weight[~module.slice_mask] == 0) and module.weight.abs().sum() > 0
