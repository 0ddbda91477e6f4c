"""Bad input fails early with an actionable ValueError / TypeError / FileNotFoundError."""

import copy
import json

import pytest
import torch
from conftest import randomize_adapters, roberta_config
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import RobertaForSequenceClassification

from hf_lorax import DoRAConfig, LoRAConfig, get_model

QV = ["query", "value"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(r=0), ValueError, "r=0 must be > 0"),
        (dict(r=-4), ValueError, "r=-4 must be > 0"),
        (dict(r=2.5), TypeError, "r must be a positive integer"),
        (dict(lora_alpha=0), ValueError, "lora_alpha=0 must be > 0"),
        (dict(lora_alpha=-1.0), ValueError, "lora_alpha=-1.0 must be > 0"),
        (dict(lora_dropout=1.0), ValueError, r"outside \[0, 1\)"),
        (dict(lora_dropout=-0.1), ValueError, r"outside \[0, 1\)"),
        (dict(num_labels=0), ValueError, "num_labels=0"),
        (dict(task_type="SEQ_CLASSIFICATION"), ValueError, "Invalid task type"),
        (dict(rank_map={"layer.0.query": 0}), ValueError, r"rank_map\['layer.0.query'\] = 0"),
        (dict(rank_map={"layer.0.query": 2.5}), ValueError, "whole numbers"),
        (dict(rank_map={"layer.0.query": "8"}), TypeError, "must be a number"),
        (dict(rank_map={"layer.{5-2}.query": 8}), ValueError, "range {5-2} is empty"),
        (dict(rank_map=["query"]), TypeError, "rank_map must be a dict"),
        (dict(rank_map="/no/such/map.json"), FileNotFoundError, "no such file"),
        (dict(alpha_map={"query": -2}), ValueError, "values must be > 0"),
        (dict(fused_slices={"c_attn": ["q", "x"]}), ValueError, r"choose a non-empty subset of \['q', 'k', 'v'\]"),
        (dict(fused_slices={"c_attn": []}), ValueError, "not valid"),
        (dict(fused_slices={"query": ["q"]}), ValueError, "'query' is not a known fused projection"),
        (dict(fused_slices={"c_attn": "qv"}), TypeError, "list of slice names"),
    ],
)
def test_invalid_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(target_modules=QV, **kwargs)


def test_dora_config_rejects_use_dora_false():
    with pytest.raises(ValueError, match="use LoRAConfig"):
        DoRAConfig(use_dora=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_modules=["query", "valeu"]), r"'valeu' matches no module.*'value'"),
        (dict(target_modules=["qkv"]), r"matched no module of the model.*'query'"),
        (dict(rank_map={"layer.7.attention.self.query": 8}), r"'layer.7.attention.self.query' matches no adapted module"),
        (dict(rank_map={"layer.{0-1}.*": 8, "layer.1.attention.self.query": 2}), "only matches modules that earlier keys"),
        (dict(rank_map={"attention.self.key": 8}), r"matches .*key.*not adapted"),
        (dict(alpha_map={"quer": 8}), "alpha_map key 'quer' matches no adapted module"),
        (dict(fused_slices={"qkv": {"layout": ["q", "k", "v"], "adapt": ["q"]}}), "fused_slices key 'qkv' matches no adapted"),
        (dict(target_modules=["query"], fused_slices={"query": {"layout": ["a", "b", "c"], "adapt": ["a"]}}),
         "do not split into 3 equal slices"),
    ],
)
def test_config_does_not_fit_the_model(kwargs, match, tiny_roberta):
    kwargs = {"target_modules": QV, **kwargs}
    model = copy.deepcopy(tiny_roberta)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoRAConfig(r=4, **kwargs))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing half-injected


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def test_dora_on_unsupported_layer():
    with pytest.raises(ValueError, match=r"DORA cannot adapt conv \(Conv2d\).*Remove it from target_modules"):
        get_peft_model(ConvNet(), DoRAConfig(r=2, target_modules=["conv", "proj"]))


def test_lora_on_other_layers_falls_back_to_peft():
    model = get_peft_model(ConvNet(), LoRAConfig(r=2, target_modules=["conv", "proj"]))
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2)


def test_get_model_errors(tmp_path, tiny_roberta):
    with pytest.raises(TypeError, match="get_model takes an hf_lorax config"):
        get_model({"r": 8})
    with pytest.raises(FileNotFoundError, match="Base model directory"):
        get_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "missing"), task_type="SEQ_CLS", target_modules=QV))
    with pytest.raises(ValueError, match="base_model_name_or_path is empty"):
        get_model(LoRAConfig(target_modules=QV))
    with pytest.raises(FileNotFoundError, match="'.*nope' is not an adapter folder nor a Hub repo id"):
        get_model(str(tmp_path / "nope"))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"not an adapter folder \(it is a file\)"):
        get_model(str(tmp_path / "file.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        get_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="num_labels=3 but the model's head has 2 labels"):
        get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=3, target_modules=QV), model=tiny_roberta)


@pytest.fixture
def saved_adapter(tmp_path, tiny_roberta):
    tiny_roberta.save_pretrained(tmp_path / "base")
    model = get_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=2,
                                 r=4, target_modules=QV))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_an_adapter_folder_given_as_the_base_model_is_named(saved_adapter, capsys):
    """transformers would load the adapter's own base and attach the adapter to it, and hf_lorax's adapter would go on
    top: refused, naming the folder, from get_model and export's --base_model alike."""
    from hf_lorax.export.__main__ import main as export_main

    with pytest.raises(ValueError, match="is a saved adapter .* not a base model"):
        get_model(LoRAConfig(base_model_name_or_path=str(saved_adapter), task_type="SEQ_CLS", target_modules=QV))
    dst = str(saved_adapter.parent / "merged")
    assert export_main([str(saved_adapter), dst, "--engine", "vllm", "--merge", "--base_model", str(saved_adapter)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a saved adapter" in err


def test_malformed_adapter_config(saved_adapter):
    path = saved_adapter / "adapter_config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        get_model(str(saved_adapter))


def test_a_damaged_sidecar_is_named_as_itself(saved_adapter):
    (saved_adapter / "hf_lorax.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match=r"^\S*hf_lorax.json is not an hf_lorax sidecar of format"):
        get_model(str(saved_adapter))


def test_truncated_safetensors(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is truncated or corrupt"):
        get_model(str(saved_adapter))


def test_adapter_that_does_not_fit_the_base(saved_adapter, tmp_path):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(hidden_size=48)).save_pretrained(tmp_path / "wider")
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "wider")
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit this base model: size mismatch for .*query.*lora_A"):
        get_model(str(saved_adapter))


def test_a_plain_peft_head_with_another_label_count_says_how_to_load_it(tmp_path):
    """A plain peft classifier (no hf_lorax.json, so no num_labels) on an encoder checkpoint: get_model loads the
    base with transformers' default 2 labels, and the error says how to give the head's count."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=37)
    RobertaForMaskedLM(config).save_pretrained(tmp_path / "base")
    plain = get_peft_model(RobertaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3),
                           LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    plain.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    plain.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"classifier.*\[3, 32\].*\[2, 32\]\)\. It is the task head: .*num_labels=N"):
        get_model(str(tmp_path / "a"))
    assert get_model(str(tmp_path / "a"), num_labels=3).get_base_model().config.num_labels == 3


def test_weights_the_checkpoint_lacks_outside_the_head_are_named_and_can_be_trained(tmp_path):
    """A BERT classifier from a masked-LM checkpoint: transformers initialises bert.pooler randomly at every load,
    inside the body, so it is not the head; without this check every reload was a different model (0.4+ in logits
    after training). Following the message (the pooler in modules_to_save) trains and saves it: the reload is exact."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path / "base")
    kwargs = dict(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=3, r=4,
                  target_modules=["query", "value"])
    with pytest.raises(ValueError, match=r"no weights for \['bert.pooler.dense.bias', 'bert.pooler.dense.weight'\] "
                                         r".*outside the task head \['classifier'\].*Add \['bert.pooler.dense'\]"):
        get_model(LoRAConfig(**kwargs))
    model = get_model(LoRAConfig(**kwargs, modules_to_save=["classifier", "bert.pooler.dense"]))
    randomize_adapters(model)
    model.eval().save_pretrained(tmp_path / "a")
    ids = torch.randint(0, 50, (2, 7))
    again = get_model(str(tmp_path / "a"), is_trainable=False)
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_causal_lm_without_its_untied_head_is_refused_but_a_bare_model_loads(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    from hf_lorax import load_base_model

    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(tmp_path / "bare")
    assert type(load_base_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "bare")))).__name__ == "LlamaModel"
    with pytest.raises(ValueError, match=r"no weights for \['lm_head.weight'\]"):
        get_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "bare"), task_type="CAUSAL_LM",
                             target_modules=["q_proj"]))
