"""Serving: adapters with rank/alpha maps are mis-served as saved; after export they are served exactly."""

import copy
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RecordingApi, gpt2_config, randomize_adapters, roberta_config
from engine_reference import EngineRefused, serve
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaForSequenceClassification

from hf_lorax import DoRAConfig, LoRAConfig, check_serving, export_adapter, get_model, push_adapter, serving

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ISSUE_MAPS = dict(rank_map={"layers.{0-1}.self_attn.q_proj": 16, "layers.{2-3}.*": 4}, alpha_map={"down_proj": 8})


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def trained(base, config, folder):
    """An hf_lorax adapter with non-trivial weights, saved to ``folder``; returns the live model."""
    model = get_model(config, model=copy.deepcopy(base))
    randomize_adapters(model, seed=3)
    model.eval().save_pretrained(folder)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("engine", ["vllm", "lorax", "tgi"])
def test_rank_and_alpha_maps_are_served_wrong_as_saved_and_exactly_after_export(tmp_path, engine):
    base = tiny_llama()
    model = trained(base, LoRAConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, **ISSUE_MAPS), tmp_path / "a")
    ours = logits(model, IDS)
    before = digest(tmp_path / "a")
    if engine == "vllm":  # (a) the bug: vLLM loads it and applies one scaling
        served_as_saved = logits(serve(base, tmp_path / "a", engine), IDS)
        assert (served_as_saved - ours).abs().max() > 1e-2
    else:  # LoRAX/TGI cannot even stack the differing ranks
        with pytest.raises(EngineRefused):
            serve(base, tmp_path / "a", engine)
    report = check_serving(str(tmp_path / "a"), engine)
    assert not report.servable_as_is and any("down_proj" in f.module for f in report.wrong)

    result = export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), engine)  # (b) exact after export
    assert result.rank == 16
    served = logits(serve(base, tmp_path / "out", engine, max_lora_rank=16), IDS)
    assert (served - ours).abs().max() < 1e-5
    assert check_serving(str(tmp_path / "out"), engine).servable_as_is
    assert digest(tmp_path / "a") == before  # src untouched
    exported = get_model(str(tmp_path / "out"), model=copy.deepcopy(base)).eval()  # hf_lorax/peft read it too
    assert (logits(exported, IDS) - ours).abs().max() < 1e-5
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Serving" in card


def test_an_adapter_without_maps_already_serves_exactly(tmp_path):
    base = tiny_llama()
    model = trained(base, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "a")
    assert (logits(serve(base, tmp_path / "a", "vllm"), IDS) - logits(model, IDS)).abs().max() < 1e-5
    assert check_serving(str(tmp_path / "a"), "vllm").servable_as_is


def test_rslora_with_maps(tmp_path):
    base = tiny_llama()
    model = trained(base, LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                     rank_map={"layers.{0-1}.*": 8}), tmp_path / "a")
    export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "vllm", rank=32)
    served = serve(base, tmp_path / "out", "vllm", max_lora_rank=32)
    assert (logits(served, IDS) - logits(model, IDS)).abs().max() < 1e-5


def test_gpt2_fused_slices_for_lorax_and_vllm_refusal(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()  # peft records its name_or_path
    config = LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                        fused_slices={"c_attn": ["q", "v"]}, rank_map={"h.1.attn.c_attn": 4}, lora_dropout=0.0)
    model = trained(base, config, tmp_path / "a")
    export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "lorax")
    assert (logits(serve(base, tmp_path / "out", "lorax"), IDS) - logits(model, IDS)).abs().max() < 1e-5
    report = check_serving(str(tmp_path / "a"), "vllm")
    assert any("no LoRA support for gpt2" in f.message for f in report.refused)
    assert "| vLLM | needs `hf_lorax.export` | `python -m hf_lorax.export ADAPTER_DIR OUT --engine vllm --merge` |" in (
        tmp_path / "a" / "README.md").read_text()  # the card names the remedy export gives
    assert report.first(serving.MODEL_TYPE).kind == "refused"  # the structured code export and the card act on
    assert {f.code for f in check_serving(str(tmp_path / "a"), "lorax").findings} >= {serving.SCALING,
                                                                                     serving.RANKS_DIFFER}
    with pytest.raises(ValueError, match="vLLM has no LoRA support for gpt2.*--merge"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "vllm"), "vllm")
    export_adapter(str(tmp_path / "a"), str(tmp_path / "merged"), "vllm", merge=True)  # a base model vLLM serves
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, IDS) - logits(model, IDS)).abs().max() < 1e-5


def test_roberta_head_is_refused_and_merged_exactly(tmp_path):
    torch.manual_seed(0)
    base = RobertaForSequenceClassification(roberta_config()).eval()
    config = LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"],
                        alpha_map={"value": 16})
    model = trained(base, config, tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter for vLLM: classifier: task heads \(modules_to_save\) are refused by vLLM.*--merge"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "vllm")
    assert not (tmp_path / "out").exists()  # nothing half-written
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for dst, engine in (("merged", "vllm"), ("again", "peft")):  # the base is copied: the caller's stays as it was
        result = export_adapter(str(tmp_path / "a"), str(tmp_path / dst), engine, merge=True, base_model=base)
        # the note says how this engine loads the folder
        assert ("`vllm serve " if engine == "vllm" else "`RobertaForSequenceClassification.from_pretrained(") in (
            result.summary())
        merged = RobertaForSequenceClassification.from_pretrained(tmp_path / dst).eval()
        assert (logits(merged, IDS) - logits(model, IDS)).abs().max() < 1e-5
    assert type(base) is RobertaForSequenceClassification
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="merged model .* has none: drop it"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "x"), "vllm", merge=True, rank=8)


def test_dora_is_refused_and_merged_exactly(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = DoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="CAUSAL_LM", r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"], rank_map={"layers.0.*": 8})
    model = trained(base, config, tmp_path / "a")
    with pytest.raises(ValueError, match="adapter for vLLM: .*q_proj: DoRA magnitudes are refused by vLLM.*--merge"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "x"), "vllm")
    assert not (tmp_path / "x").exists()
    export_adapter(str(tmp_path / "a"), str(tmp_path / "merged"), "vllm", merge=True)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, IDS) - logits(model, IDS)).abs().max() < 1e-5


def test_merged_classifier_from_a_causal_lm_checkpoint_keeps_its_head(tmp_path):
    """The base checkpoint names LlamaForCausalLM, the adapter is a 3-label classifier: the merge loads the task's
    class with the adapter's num_labels (not the checkpoint's class, which has no classifier head)."""
    from transformers import LlamaForSequenceClassification

    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, pad_token_id=0).eval()
    model = trained(base, LoRAConfig(base_model_name_or_path=str(tmp_path / "base"), task_type="SEQ_CLS", num_labels=3,
                                     r=4, target_modules=["q_proj"]), tmp_path / "a")
    export_adapter(str(tmp_path / "a"), str(tmp_path / "m"), "vllm", merge=True)
    merged = LlamaForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert merged.config.architectures == ["LlamaForSequenceClassification"] and merged.config.num_labels == 3
    assert (logits(merged, IDS) - logits(model, IDS)).abs().max() < 1e-5


def test_bad_input_is_named(tmp_path):
    base = tiny_llama()
    trained(base, LoRAConfig(r=8, target_modules=["q_proj"], rank_map={"layers.0.self_attn.q_proj": 600}), tmp_path / "a")
    with pytest.raises(ValueError, match="Unknown serving engine 'triton'.*lorax"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "x"), "triton")
    with pytest.raises(ValueError, match="inside the source adapter"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "a" / "x"), "vllm")
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj has rank 600, above vLLM's limit 512"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "x"), "vllm")
    with pytest.raises(ValueError, match="has rank 600, above --rank 16"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "x"), "lorax", rank=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        export_adapter(str(tmp_path / "empty"), str(tmp_path / "x"), "vllm")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "full"), "lorax", rank=600)
    assert not (tmp_path / "x").exists()


def test_cli_export_check_and_errors(tmp_path, capsys):
    from hf_lorax.export.__main__ import main

    base = tiny_llama()
    trained(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **{"alpha_map": {"v_proj": 2}}), tmp_path / "a")
    assert main(["--check", str(tmp_path / "a"), "--engine", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "served wrong" in out and "v_proj" in out
    assert main([str(tmp_path / "a"), str(tmp_path / "out"), "--engine", "vllm"]) == 0
    assert "wrote adapter for vLLM" in capsys.readouterr().out
    assert main(["--check", str(tmp_path / "out"), "--engine", "vllm"]) == 0
    assert main(["--check", str(tmp_path / "out"), "--merge"]) == 2  # a flag --check would ignore
    assert main([str(tmp_path / "nope"), str(tmp_path / "o2"), "--engine", "vllm"]) == 2
    assert main([str(tmp_path / "a"), str(tmp_path / "o2")]) == 2  # neither an engine nor --merge
    base.save_pretrained(tmp_path / "base")  # --merge needs no engine: the merged model serves anywhere
    assert main([str(tmp_path / "a"), str(tmp_path / "m"), "--merge", "--base_model", str(tmp_path / "base")]) == 0
    assert "LlamaForCausalLM.from_pretrained(" in capsys.readouterr().out
    # the real process: exit code 2, one line, no traceback
    bad = subprocess.run([sys.executable, "-m", "hf_lorax.export", str(tmp_path / "a"), str(tmp_path / "a" / "in"),
                          "--engine", "vllm"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "inside the source adapter" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_pushed_card_says_where_the_adapter_serves_as_saved(tmp_path):
    base = tiny_llama()
    trained(base, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], alpha_map={"v_proj": 2}), tmp_path / "a")
    api = RecordingApi()
    push_adapter(str(tmp_path / "a"), "me/x", api=api)
    assert {"adapter_model.safetensors", "README.md"} <= set(api.uploaded())
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| vLLM | needs `hf_lorax.export` |" in card and "| peft | loads as is |" in card


def test_trainer_checkpoints_skip_the_card_and_final_saves_render_it(tmp_path):
    """A Trainer's checkpoint-<step> save keeps peft's short card (no folder re-read, no serving checks); any
    other save_pretrained renders hf_lorax's card with its serving table."""
    model = get_model(LoRAConfig(r=2, target_modules=["q_proj"]), model=tiny_llama())
    model.save_pretrained(tmp_path / "checkpoint-10")
    model.save_pretrained(tmp_path / "final")
    assert "Serving" not in (tmp_path / "checkpoint-10" / "README.md").read_text()
    assert (tmp_path / "checkpoint-10" / "adapter_model.safetensors").is_file()
    assert "Serving" in (tmp_path / "final" / "README.md").read_text()
