"""The library internals hf_lorax touches: signatures as verified, hooks that switch off cleanly, a pure plan."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from transformers import RobertaForSequenceClassification

import hf_lorax
from hf_lorax import DoRAConfig, LoRAConfig, get_model, resolve
from hf_lorax.hooks import install
from hf_lorax.integrations.guard import InternalAPI, require_signatures
from hf_lorax.integrations.peft_api import HOTSWAP_FROM_STATE_DICT, PEFT_INTERNALS
from hf_lorax.integrations.sharding import DEFAULT_STORE
from hf_lorax.integrations.transformers_api import LOAD_ADAPTER, LOSS_MAPPING_API


def test_every_internal_has_the_verified_signature():
    """Fails as soon as a peft or transformers release changes a signature hf_lorax relies on."""
    problems = {api.path: api.problem() for api in [*PEFT_INTERNALS, HOTSWAP_FROM_STATE_DICT, LOAD_ADAPTER,
                                                     LOSS_MAPPING_API, DEFAULT_STORE]}
    assert {path: problem for path, problem in problems.items() if problem} == {}


def test_all_hooks_are_installed_in_the_tested_range():
    assert install() == {api.path: True for api in [*PEFT_INTERNALS[:2], LOAD_ADAPTER, HOTSWAP_FROM_STATE_DICT]}


def test_a_changed_signature_or_version_is_reported():
    moved = InternalAPI(path="peft.tuners.lora.model:LoraModel._prepare_model", params=("self", "config"),
                        library="peft", verified=("0.21.0", "0.22.0"), reason="test")
    assert "expected ('self', 'config')" in moved.problem()
    newer = InternalAPI(path="peft.tuners.lora.model:LoraModel._prepare_model", params=("self",),
                        library="peft", verified=("0.1.0", "0.2.0"), reason="test")
    assert "outside the verified range [0.1.0, 0.2.0)" in newer.problem()
    gone = InternalAPI(path="peft.tuners.lora.model:LoraModel._no_such_method", params=(), library="peft",
                       verified=("0.21.0", "0.22.0"), reason="test")
    assert "is gone" in gone.problem()
    with pytest.raises(RuntimeError, match="cannot build its LoRA layers.*_prepare_model has the signature"):
        require_signatures([moved], "build its LoRA layers")


def test_a_changed_peft_internal_stops_get_model_before_the_base_changes(monkeypatch):
    """The signature check of the peft internals hf_lorax's layers build on runs with the plan's checks, before
    get_model changes the base (a GPT-2 classifier's pad token, the logits-free forward)."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    import hf_lorax.integrations.peft_api as peft_api

    moved = InternalAPI(path="peft.tuners.lora.model:LoraModel._prepare_model", params=("self", "config"),
                        library="peft", verified=("0.21.0", "0.22.0"), reason="test")
    monkeypatch.setattr(peft_api, "PEFT_INTERNALS", [*peft_api.PEFT_INTERNALS, moved])
    classifier, lm = GPT2ForSequenceClassification(gpt2_config(num_labels=2, pad_token_id=None)), GPT2LMHeadModel(gpt2_config())
    for task, base in (("SEQ_CLS", classifier), ("CAUSAL_LM", lm)):
        with pytest.raises(RuntimeError, match="_prepare_model has the signature"):
            get_model(LoRAConfig(task_type=task, num_labels=2 if task == "SEQ_CLS" else None,
                                 target_modules=["c_attn"]), model=base)
    assert classifier.config.pad_token_id is None and type(lm) is GPT2LMHeadModel


def test_outside_the_verified_range_hooks_stay_off_and_get_model_still_works(tmp_path):
    """Simulate peft 0.22: both peft hooks are skipped with a warning; get_model resolves the plan itself."""
    script = textwrap.dedent(f"""
        import importlib.metadata, warnings, torch
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.22.0" if name == "peft" else real(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hf_lorax
        messages = [str(w.message) for w in caught if "hf_lorax: not hooking" in str(w.message)]
        assert len(messages) == 3 and all("outside the verified range" in m for m in messages), messages
        from transformers import GPT2Config, GPT2LMHeadModel
        from hf_lorax import LoRAConfig, get_model
        base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64))
        config = LoRAConfig(r=2, target_modules=["c_attn"], fused_slices={{"c_attn": ["q", "v"]}},
                            rank_map={{"h.1.attn.c_attn": 4}})
        model = get_model(config, model=base)
        ranks = {{n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.r}}
        assert sorted(ranks.values()) == [4, 8], ranks  # n*r per fused module: 2*2 and 2*4
        model.save_pretrained({str(tmp_path / "a")!r})
        again = get_model({str(tmp_path / "a")!r}, model=GPT2LMHeadModel(base.config))
        assert type(again.peft_config["default"]).__name__ == "LoRAConfig"
        assert "rank_map, alpha_map and fused_slices are NOT applied" in messages[0]  # peft's own path, said aloud
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_resolve_is_pure_and_get_model_leaves_the_config_alone(tiny_roberta):
    config = DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, lora_alpha=8, target_modules=["query", "value"],
                        rank_map={"layer.0.attention.self.query": 16}, alpha_map={"value": 2})
    before = copy.deepcopy(config.__dict__)
    model_before = {k: v.clone() for k, v in tiny_roberta.state_dict().items()}
    plan = resolve(config, tiny_roberta)
    assert config.__dict__ == before and config.resolved_plan is None
    assert all(torch.equal(v, tiny_roberta.state_dict()[k]) for k, v in model_before.items())
    q0 = plan.modules["roberta.encoder.layer.0.attention.self.query"]
    v1 = plan.modules["roberta.encoder.layer.1.attention.self.value"]
    assert (q0.r, q0.alpha, q0.scaling, q0.method) == (16, 8, 0.5, "dora")
    assert (v1.r, v1.alpha, v1.scaling) == (4, 2, 0.5)
    assert plan.modules_to_save == ("classifier",)
    with pytest.raises(TypeError):
        plan.modules["x"] = q0  # the plan is read-only

    model = get_model(config, model=copy.deepcopy(tiny_roberta))
    assert config.__dict__ == before  # the user's object: untouched
    held = model.peft_config["default"]
    assert held is not config and held.resolved_plan is not None
    assert held.rank_pattern["roberta.encoder.layer.0.attention.self.query"] == 16


def test_the_plan_reaches_the_layers(tiny_gpt2):
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fused_slices={"c_attn": ["q", "v"]},
                        rank_map={"h.1.*": 8}, use_rslora=True)
    plan = resolve(config, tiny_gpt2)
    model = get_model(config, model=copy.deepcopy(tiny_gpt2))
    for name, entry in plan.modules.items():
        layer = model.get_submodule(f"base_model.model.{name}")
        assert layer.r["default"] == entry.module_r
        assert layer.scaling["default"] == pytest.approx(entry.scaling), name
    assert plan.sliced_modules == {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.attn.c_attn": 2}


def test_get_model_saves_all_or_nothing_with_the_card(tmp_path):
    torch.manual_seed(0)
    base = RobertaForSequenceClassification(roberta_config())
    model = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query"]), model=base)
    assert isinstance(model, hf_lorax.model.HfLoraxPeftModel)
    assert type(model).__name__ == "PeftModelForSequenceClassification"  # the class keeps peft's name
    assert type(model).__qualname__ == "HfLoraxPeftModelForSequenceClassification"
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "hf_lorax" in card and "Adapted modules (2)" in card
    assert not [p for p in tmp_path.iterdir() if ".hf_lorax-tmp-" in p.name]


def test_a_classifiers_pad_id_is_recorded_and_given_to_the_reloaded_base(tmp_path):
    """A decoder's classifier finds each row's last token by its pad id. The one it trained with (the user's, not eos)
    is saved in hf_lorax.json and given to the base get_model loads, and the card's snippet passes it: right-padded
    rows score as in training (with eos as the pad id, the last pad would be read instead)."""
    import json

    from peft import get_peft_model
    from transformers import GPT2ForSequenceClassification

    from hf_lorax import write_model_card

    GPT2ForSequenceClassification(gpt2_config(num_labels=2, pad_token_id=None)).save_pretrained(tmp_path / "base")
    base = GPT2ForSequenceClassification.from_pretrained(tmp_path / "base")
    base.config.pad_token_id = 5  # the user's tokenizer's pad id
    model = get_peft_model(base, LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS",
                                            num_labels=2, r=2, target_modules=["c_attn"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "hf_lorax.json").read_text())["pad_token_id"] == 5
    again = get_model(str(tmp_path / "a"), is_trainable=False)
    assert again.config.pad_token_id == 5
    ids = torch.tensor([[1, 2, 3, 5, 5], [4, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits)
    write_model_card(str(tmp_path / "a"))
    assert "num_labels=2, pad_token_id=5" in (tmp_path / "a" / "README.md").read_text()
