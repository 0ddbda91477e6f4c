"""Every peft / transformers entry point holds what plain peft would hold (issue 22, cases 1-4 and 9).

The reference is always plain peft: a ``peft.LoraConfig`` built from the resolved config's ``to_dict()`` (what
``adapter_config.json`` holds), with peft's own layers and the same adapter weights copied in, or plain peft
loading the saved folder without ``hf_lorax.json``. Outputs must agree to 1e-5.
"""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import build_gpt2, gpt2_config, randomize_adapters
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, get_model
from hf_lorax.layers import SlicedLoraB

LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig) if f.init}

KINDS = {
    "lora": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "dora": lambda: DoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "maps": lambda: LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                               rank_map={"h.1.*": 2, "h.0.attn.c_proj": 8}, alpha_map={"c_proj": 3}),
    "slices": lambda: LoRAConfig(task_type="CAUSAL_LM", r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                 fused_slices={"c_attn": ["q", "v"]}, rank_map={"h.1.attn.c_attn": 4}),
    "dora-slices": lambda: DoRAConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_attn"],
                                      fused_slices={"c_attn": ["q", "v"]}, use_rslora=True),
}


def plain_config(config) -> LoraConfig:
    """The plain peft config of a resolved hf_lorax config: exactly what its adapter_config.json says."""
    return LoraConfig(**{k: v for k, v in config.to_dict().items() if k in LORA_FIELDS})


def plain_twin(model, base):
    """Plain peft on ``base`` with every adapter of ``model`` (same configs as peft reads them, same weights)."""
    names = list(model.peft_config)
    ref = get_peft_model(base, plain_config(model.peft_config[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        ref.add_adapter(name, plain_config(model.peft_config[name]))
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing = set(state) - set(ref.state_dict())
    assert not missing, sorted(missing)[:3]
    ref.load_state_dict(state, strict=False)
    return ref.eval()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _normalised(d: dict) -> dict:
    out = json.loads(json.dumps(d, default=sorted))
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = sorted(out["target_modules"])
    return out


# -- case 2: the user's config is never changed; one config, two models ------------------------------------


def _build(entry: str, base, config):
    if entry == "get_peft_model":
        return get_peft_model(base, config)
    if entry == "add_adapter":
        model = get_peft_model(base, LoraConfig(r=1, target_modules=["c_fc"]))
        model.add_adapter("x", config)
        model.set_adapter("x")
        return model
    if entry == "transformers_add_adapter":
        base.add_adapter(config, adapter_name="x")
        return base
    return get_model(config, model=base)


def _changed_fields(config, entry: str) -> set[str]:
    before = copy.deepcopy(config.__dict__)
    _build(entry, build_gpt2(), config)
    return {k for k, v in before.items() if config.__dict__[k] != v}


@pytest.mark.parametrize("entry", ["get_peft_model", "add_adapter", "transformers_add_adapter", "get_model"])
def test_one_config_two_models(entry, input_ids):
    config = LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"],
                        rank_map={"h.{1-5}.*": 2})
    # what peft / transformers themselves write into a config they are given (fan_in_fan_out for GPT-2's
    # Conv1D, base_model_name_or_path): hf_lorax adds nothing to it
    theirs = _changed_fields(LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]), entry) \
        if entry != "get_model" else set()
    before = copy.deepcopy(config.__dict__)
    built = []
    for n_layer in (2, 3):
        model = _build(entry, build_gpt2(n_layer=n_layer), config)
        changed = {k for k, v in before.items() if config.__dict__[k] != v}
        assert changed <= theirs, (entry, changed)  # hf_lorax changes nothing in the user's object
        built.append(model)
    third = built[1].get_submodule(("base_model.model." if entry != "transformers_add_adapter" else "")
                                   + "transformer.h.2.attn.c_attn")
    adapter = "x" if entry in ("add_adapter", "transformers_add_adapter") else "default"
    assert third.r[adapter] == 2 and third.lora_A[adapter].weight.shape == (2, 32)
    if entry != "transformers_add_adapter":
        randomize_adapters(built[1])
        held = built[1].peft_config[adapter]
        assert held is not config and held.rank_pattern == {f"transformer.h.{i}.attn.c_attn": 2 for i in (1, 2)}
        if entry != "add_adapter":
            torch.testing.assert_close(logits(built[1], input_ids), logits(plain_twin(built[1], build_gpt2(n_layer=3)), input_ids),
                                       atol=1e-5, rtol=1e-5)


# -- case 1: add_weighted_adapter ---------------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["cat", "svd"])
@pytest.mark.parametrize("kind", ["maps", "slices"])
def test_add_weighted_adapter_matches_plain_peft(kind, combination, input_ids):
    config = KINDS[kind]()
    ours = get_peft_model(build_gpt2(), config)
    ours.add_adapter("b", config)
    randomize_adapters(ours, seed=3)
    ref = plain_twin(ours, build_gpt2())
    for model in (ours, ref):
        model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "merged", combination_type=combination)
        model.set_adapter("merged")
    assert ours.peft_config["merged"].to_dict() == ref.peft_config["merged"].to_dict() | {
        "task_type": ours.peft_config["merged"].task_type}
    torch.testing.assert_close(logits(ours, input_ids), logits(ref, input_ids), atol=1e-5, rtol=1e-5)


# -- the saved folder through every loader (cases 3 and the matrix) ---------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (base dir, adapter dir, plain copy without hf_lorax.json)} for every config kind."""
    root = tmp_path_factory.mktemp("paths")
    base_dir = root / "base"
    build_gpt2().save_pretrained(base_dir)
    out = {}
    for kind, make in KINDS.items():
        config = make()
        config.base_model_name_or_path = str(base_dir)
        model = get_model(config)
        randomize_adapters(model, seed=len(kind))
        model.save_pretrained(root / kind)
        shutil.copytree(root / kind, root / f"{kind}-plain")
        (root / f"{kind}-plain" / "hf_lorax.json").unlink()
        out[kind] = (base_dir, root / kind, root / f"{kind}-plain")
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_loader_equals_plain_peft(kind, saved, input_ids):
    base_dir, folder, plain_folder = saved[kind]
    reference = logits(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), plain_folder), input_ids)
    assert type(PeftConfig.from_pretrained(plain_folder)) is LoraConfig

    peft_loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), folder, is_trainable=True)
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)
    lazy = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), folder, low_cpu_mem_usage=True)
    hf_loaded = get_model(str(folder))
    transformers_loaded = GPT2LMHeadModel.from_pretrained(base_dir)
    transformers_loaded.load_adapter(str(folder))
    for name, model in [("PeftModel", peft_loaded), ("AutoPeftModel", auto), ("low_cpu_mem_usage", lazy),
                        ("get_model", hf_loaded),
                        ("transformers", transformers_loaded)]:
        torch.testing.assert_close(logits(model, input_ids), reference, atol=1e-5, rtol=1e-5, msg=name)
    if "slices" in kind:
        layer = peft_loaded.base_model.model.transformer.h[0].attn.c_attn
        assert isinstance(layer.lora_B["default"], SlicedLoraB)  # training resumes on the slices only
        assert isinstance(transformers_loaded.transformer.h[1].attn.c_attn.lora_B["default"], SlicedLoraB)


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_config_round_trips_as_plain_peft(kind, saved, tmp_path, input_ids):
    base_dir, folder, plain_folder = saved[kind]
    on_disk = json.loads((folder / "adapter_config.json").read_text())
    config = PeftConfig.from_pretrained(folder)
    assert isinstance(config, LoRAConfig)
    assert _normalised(config.to_dict()) == _normalised(on_disk)
    from safetensors.torch import load_file

    keys = load_file(folder / "adapter_model.safetensors")
    assert not [k for k in keys if ".default." in k or ".blocks." in k]  # peft's standard keys only
    config.save_pretrained(tmp_path / "again")  # saving the loaded config again: a folder plain peft loads
    shutil.copy(folder / "adapter_model.safetensors", tmp_path / "again")
    (tmp_path / "again" / "hf_lorax.json").unlink()
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "again")
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), plain_folder)
    torch.testing.assert_close(logits(again, input_ids), logits(reference, input_ids), atol=1e-5, rtol=1e-5)


def test_loaded_slices_keep_off_block_entries_at_zero_while_training(saved):
    base_dir, folder, _ = saved["slices"]
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), folder, is_trainable=True).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 96, (2, 10))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for module in model.modules():
        if isinstance(module, SlicedLoraB):
            assert torch.all(module.weight[~module.slice_mask] == 0)
            assert module.weight[module.slice_mask].abs().sum() > 0


# -- case 4: QLoRAConfig on an unquantized model ------------------------------------------------------------


def test_qlora_config_through_peft_refuses_an_unquantized_model():
    config = QLoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    base = build_gpt2()
    with pytest.raises(ValueError, match="QLoRAConfig needs a quantized base.*quantization_config"):
        get_peft_model(base, config)
    assert not any("lora_" in n for n, _ in base.named_parameters())  # nothing was injected
    with pytest.raises(ValueError, match="no bitsandbytes-quantized linear layers"):
        base.add_adapter(config)


# -- case 9: get_model validates before it changes the base -------------------------------------------------


def test_get_model_changes_nothing_before_rejecting_a_typo():
    torch.manual_seed(0)
    cls_base = GPT2ForSequenceClassification(gpt2_config(num_labels=2, pad_token_id=None))
    with pytest.raises(ValueError, match="'c_projj' matches no module"):
        get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=2, target_modules=["c_attn", "c_projj"]), model=cls_base)
    assert cls_base.config.pad_token_id is None and type(cls_base) is GPT2ForSequenceClassification
    lm = build_gpt2()
    with pytest.raises(ValueError, match="rank_map key"):
        get_model(LoRAConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], rank_map={"h.9.attn": 2}), model=lm)
    assert type(lm) is GPT2LMHeadModel and "loss_function" not in vars(lm)
