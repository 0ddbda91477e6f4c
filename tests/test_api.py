"""Public helpers: describe, LoRA+, config round trip."""

import copy
import json

import pytest
import torch
from peft import get_peft_model

import hf_lorax
from hf_lorax import DoRAConfig, LoRAConfig, create_loraplus_optimizer, describe, loraplus_param_groups

PUBLIC = {
    "AdapterPlan", "AdapterReport", "DoRAConfig", "LoRAConfig", "QLoRAConfig", "RankUtilizationCallback",
    "TargetedLossTrainer", "__version__", "check_serving", "create_loraplus_optimizer", "describe", "export_adapter",
    "get_model", "hotswap_adapter", "load_base_model", "loraplus_param_groups", "merge_and_unload", "push_adapter",
    "read_adapter_folder", "resolve", "write_model_card",
}


def test_public_api_keeps_every_name_and_each_resolves():
    """What users import stays importable: ``__all__`` holds at least these names, each a real object (classes and
    functions documented), and ``from hf_lorax import *`` gives them all."""
    assert PUBLIC <= set(hf_lorax.__all__)
    namespace = {}
    exec("from hf_lorax import *", namespace)
    for name in hf_lorax.__all__:
        value = namespace[name]
        assert value is getattr(hf_lorax, name), name
        assert name == "__version__" or callable(value) and value.__doc__, name
    assert issubclass(hf_lorax.TargetedLossTrainer, __import__("transformers").Trainer)


def test_describe_table(tiny_roberta):
    model = get_model_for(tiny_roberta, DoRAConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                   rank_map={"layer.0.attention.self.query": 16}))
    report = describe(model)
    rows = {r.module: r for r in report.rows}
    q0 = rows["roberta.encoder.layer.0.attention.self.query"]
    assert (q0.r, q0.alpha, q0.scaling, q0.method, q0.layer) == (16, 16, 1.0, "dora", "Linear")
    assert q0.params == 16 * 32 + 32 * 16 + 32  # A, B, magnitude
    assert rows["roberta.encoder.layer.1.attention.self.value"].scaling == 2.0
    assert report.adapter_params == sum(r.params for r in report.rows)
    text = str(report)
    assert "roberta.encoder.layer.0.attention.self.query" in text and "trainable" in text
    assert report.to_markdown().startswith("| module |")
    json.dumps(report.to_dict())


def get_model_for(base, config):
    return get_peft_model(copy.deepcopy(base), config)


def test_loraplus_groups_only_scale_B(tiny_roberta):
    model = hf_lorax.get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"]),
                               model=copy.deepcopy(tiny_roberta))
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == (16e-3 if ".lora_B." in name else 1e-3), name
            if "magnitude" in name or "bias" in name:
                assert group["weight_decay"] == 0.0, name
    optimizer = create_loraplus_optimizer(model, lr=1e-3)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=0.5)


def test_config_to_dict_is_plain_peft():
    from peft import LoraConfig

    config = DoRAConfig(r=4, target_modules=["q"], rank_map={"q": 8}, num_labels=3, fused_slices=None)
    as_dict = config.to_dict()
    assert not {"rank_map", "alpha_map", "num_labels", "fused_slices"} & as_dict.keys()
    as_dict.pop("peft_type")
    LoraConfig(**{k: v for k, v in as_dict.items() if k != "auto_mapping"})  # constructible by plain peft
    assert config.method == "dora" and LoRAConfig(target_modules=["q"]).method == "lora"
