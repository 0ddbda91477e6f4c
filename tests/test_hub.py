"""Adapter-only Hub pushes: exact file set, refusals, dry run, model card, token hygiene (recorded HfApi)."""

import json
import logging
import os
import shutil

import pytest
import torch
import yaml
from conftest import RecordingApi, randomize_adapters, roberta_config
from huggingface_hub import ModelCard
from transformers import RobertaForSequenceClassification

import hf_lorax.hub as hub
from hf_lorax import DoRAConfig, get_model, push_adapter

TOKEN = "hf_TESTSECRETTOKEN0123456789"
RESULTS = {
    "task": "sst2", "task_type": "text-classification",
    "dataset": {"name": "GLUE SST-2", "type": "nyu-mll/glue", "config": "sst2", "split": "validation"},
    "metrics": {"accuracy": 0.9312},
    "reference": {"source": "LoRA paper (Hu et al. 2021), Table 2", "metrics": {"accuracy": 0.951}},
    "hyperparameters": {"learning_rate": 0.0005, "epochs": 60},
}


@pytest.fixture
def adapter_dir(tmp_path):
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config()).save_pretrained(tmp_path / "base")
    base = RobertaForSequenceClassification.from_pretrained(tmp_path / "base")
    base.name_or_path = "roberta-base"  # as if loaded from the Hub
    model = get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, lora_alpha=8,
                                 target_modules=["query", "value"], rank_map={"layer.1.*": 2}), model=base)
    randomize_adapters(model)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    (folder / "results.json").write_text(json.dumps(RESULTS))
    (folder / "training_args.bin").write_bytes(b"x")  # not an adapter file: must not be uploaded
    return folder


def test_push_uploads_exactly_the_adapter_files(adapter_dir, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = RecordingApi()
    caplog.set_level(logging.DEBUG)
    plan = push_adapter(str(adapter_dir), "me/roberta-dora-sst2", private=True, api=api, token=TOKEN)
    (name, create), (_, commit) = api.calls
    assert name == "create_repo" and create == {"repo_id": "me/roberta-dora-sst2", "private": True, "exist_ok": True,
                                                "repo_type": "model"}
    assert api.uploaded() == ["README.md", "adapter_config.json", "adapter_model.safetensors", "hf_lorax.json", "results.json"]
    assert plan.skipped == ["training_args.bin"]
    assert plan.commit_url.endswith("/commit/abc")
    text = caplog.text + (adapter_dir / "README.md").read_text() + plan.describe()
    assert TOKEN not in text


def test_default_api_is_hfapi_with_the_given_token(adapter_dir, recorded_hub):
    push_adapter(str(adapter_dir), "me/x", token=TOKEN)
    assert recorded_hub[0].token == TOKEN and [c[0] for c in recorded_hub[0].calls] == ["create_repo", "create_commit"]


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors"])
def test_refuses_base_model_weights(adapter_dir, weights):
    (adapter_dir / weights).write_bytes(b"0" * 10)
    api = RecordingApi()
    with pytest.raises(ValueError, match=f"holds base-model weights \\({weights}\\)"):
        push_adapter(str(adapter_dir), "me/x", api=api)
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["me/x y", "a/b/c", ""])
def test_a_dry_run_refuses_an_invalid_repo_id(adapter_dir, repo_id):
    card = (adapter_dir / "README.md").read_text()
    with pytest.raises(ValueError, match=f"'{repo_id}'"):
        push_adapter(str(adapter_dir), repo_id, dry_run=True)
    assert (adapter_dir / "README.md").read_text() == card  # refused before the card is rendered for it


def test_refuses_oversized_files(adapter_dir, monkeypatch):
    monkeypatch.setattr(hub, "MAX_SIDE_FILE_BYTES", 10)
    with pytest.raises(ValueError, match="over the 10-byte bound"):
        push_adapter(str(adapter_dir), "me/x", api=RecordingApi())


def test_refuses_non_adapter_tensors(adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.roberta.embeddings.word_embeddings.weight"] = torch.zeros(96, 32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="non-adapter tensors"):
        push_adapter(str(adapter_dir), "me/x", api=RecordingApi())


def test_dry_run_prints_files_and_writes_card(adapter_dir, capsys):
    from scripts.push_adapter import main

    assert main([str(adapter_dir), "--repo_id", "me/roberta-dora-sst2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "results.json"):
        assert name in out
    assert "dry run: nothing uploaded" in out and "training_args.bin" in out
    assert ModelCard.load(adapter_dir / "README.md").data.library_name == "peft"


def test_card_metadata_and_model_index(adapter_dir):
    push_adapter(str(adapter_dir), "me/roberta-dora-sst2", dry_run=True, license="mit")
    card = ModelCard.load(adapter_dir / "README.md")
    data = card.data
    assert data.base_model == "roberta-base" and data.library_name == "peft" and data.license == "mit"
    assert {"dora", "hf_lorax", "peft"} <= set(data.tags)
    assert data.pipeline_tag == "text-classification" and data.datasets == ["nyu-mll/glue"]
    result = data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.9312, "nyu-mll/glue")
    meta = yaml.safe_load(str(card).split("---")[1])
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9312
    body = card.text
    assert "| accuracy | 0.9312 | 0.951 | -0.0198 |" in body
    assert "PeftModel.from_pretrained(base, \"me/roberta-dora-sst2\")" in body
    assert "roberta.encoder.layer.1.attention.self.value" in body and "| learning_rate | 0.0005 |" in body


def test_card_golden_file(adapter_dir, tmp_path):
    """The rendered card, with run-specific numbers masked, equals tests/golden/adapter_card.md."""
    import re
    from pathlib import Path

    push_adapter(str(adapter_dir), "me/roberta-dora-sst2", dry_run=True, license="mit")
    text = (adapter_dir / "README.md").read_text()
    text = re.sub(r"\d+\.\d+ KiB", "<size>", text)
    text = re.sub(r"peft \d+\.\d+\.\d+\S*", "peft <version>", text)
    golden = Path(__file__).parent / "golden" / "adapter_card.md"
    if os.environ.get("HF_LORAX_UPDATE_GOLDEN") == "1":  # regenerate deliberately, then review the diff
        golden.write_text(text)
    assert text == golden.read_text()


def test_save_pretrained_writes_the_same_card(adapter_dir, tmp_path):
    card = ModelCard.load(adapter_dir / "README.md")  # written by the hook during save_pretrained
    assert {"dora", "hf_lorax"} <= set(card.data.tags) and card.data.base_model == "roberta-base"
    assert "Adapted modules (4)" in card.text


def test_plain_folder_without_safetensors(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        push_adapter(str(adapter_dir), "me/x", api=RecordingApi())


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_adapter(str(tmp_path / "nope"), "me/x", api=RecordingApi())
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_trainer_model_card_is_hf_lorax_card(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(roberta_config())
    base.name_or_path = "roberta-base"
    model = get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"]), model=base)
    ids = torch.randint(3, 96, (8, 6))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": [0, 1] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="roberta-dora")  # what Trainer(push_to_hub=True) runs before uploading
    card = ModelCard.load(tmp_path / "README.md")
    assert {"dora", "hf_lorax"} <= set(card.data.tags) and "PeftModel.from_pretrained" in card.text


def test_the_cards_plain_peft_snippet_serves_a_decoder_classifier_without_hf_lorax(tmp_path):
    """The card's "With plain peft" code, run as written in a process without hf_lorax, on a Llama classifier whose
    checkpoint has no pad token: a padded batch gives the trained model's logits."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from hf_lorax import LoRAConfig, write_model_card

    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=2, pad_token_id=None, num_labels=3)).save_pretrained(tmp_path / "base")
    model = get_model(LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=3,
                                 r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.eval().save_pretrained(tmp_path / "a")
    card = write_model_card(str(tmp_path / "a"), repo_id=str(tmp_path / "a"))
    with open(card, encoding="utf-8") as f:
        snippet = f.read().split("With plain peft (hf_lorax not needed):")[1].split("```python\n")[1].split("```")[0]
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 2, 2]])
    torch.save(ids, tmp_path / "ids.pt")
    script = (f"import sys, torch\nsys.modules['hf_lorax'] = None\n{snippet}ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
              f"torch.save(model(input_ids=ids).logits, {str(tmp_path / 'out.pt')!r})\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)


def test_a_local_base_path_is_warned_about(adapter_dir, caplog):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/data/llama"}))
    with caplog.at_level(logging.WARNING, logger="hf_lorax.hub"):
        push_adapter(str(adapter_dir), "me/x", dry_run=True)
    assert "local path (/data/llama)" in caplog.text and "base_model_name_or_path" in caplog.text
