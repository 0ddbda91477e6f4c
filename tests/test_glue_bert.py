"""A BERT-family classifier through run_glue's code path (issue 21: ``modules_to_save`` once named BERT's
``dropout``, which peft's suffix match also found in every ``lora_dropout``: a TypeError before training)."""

import json

import torch
from conftest import roberta_config
from test_glue import _args, run, write_glue
from transformers import BertConfig, BertForSequenceClassification

from hf_lorax_paper.tasks.synthetic import build_tokenizer


def _tiny_bert(path) -> str:
    tokenizer = build_tokenizer()
    sizes = {k: v for k, v in roberta_config(vocab_size=len(tokenizer)).to_dict().items()
             if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "pad_token_id", "num_labels")}
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**sizes)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_run_glue_trains_a_bert_classifier_with_the_roberta_preset(tmp_path):
    base = _tiny_bert(tmp_path / "bert")
    glue = write_glue(tmp_path / "glue")
    out = tmp_path / "run"
    results = run(_args(base, glue, out, "sst2", preset="roberta-base/sst2", max_steps=2))
    assert results["main_metric"]["value"] is not None
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "dropout" not in saved["modules_to_save"] and "classifier" in saved["modules_to_save"]
    assert sorted(saved["target_modules"]) == ["query", "value"]
