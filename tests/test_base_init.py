"""Adapters whose initialisation changed the base (PiSSA, OLoRA, ...): flagged, converted exactly, or refused.

The reference for "exact" is independent of hf_lorax: the trained peft model itself (on its residual base),
vLLM's arithmetic on the *original* base (tests/engine_reference.py), and peft's own conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``).
"""

import copy
import json

import pytest
import torch
from engine_reference import serve, served_deltas
from peft import LoraConfig, PeftModel, get_peft_model
from test_export import IDS, logits, tiny_llama

from hf_lorax import check_serving, export_adapter, write_model_card
from hf_lorax.export.__main__ import main as export_main

TARGETS = ["q_proj", "v_proj"]


def pissa_like(base, init, folder, **kwargs):
    """A peft adapter with ``init_lora_weights=init``: its initial state saved to ``folder/init`` (as peft's docs
    do), then "trained" (factors moved) and saved to ``folder/a``; returns the trained model."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights=init, **kwargs))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(folder / "init")
    model.peft_config["default"].init_lora_weights = init
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.eval().save_pretrained(folder / "a")
    return model


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_flagged_as_saved_and_served_exactly_after_conversion(init, tmp_path):
    base = tiny_llama()
    ours = logits(pissa_like(base, init, tmp_path), IDS)
    # the bug: vLLM adds s·BA to the original weights
    assert (logits(serve(base, tmp_path / "a", "vllm"), IDS) - ours).abs().max() > 0.1
    report = check_serving(str(tmp_path / "a"), "vllm")
    assert not report.servable_as_is and f"init_lora_weights={init!r}" in str(report) and "--initial_adapter" in str(report)
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}.*--initial_adapter INIT_DIR"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "refused"), "vllm")
    assert not (tmp_path / "refused").exists()

    result = export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "vllm", initial_adapter=str(tmp_path / "init"))
    assert result.rank == 8 and "converted from init_lora_weights" in result.summary()
    assert (logits(serve(base, tmp_path / "out", "vllm"), IDS) - ours).abs().max() < 1e-4
    assert check_serving(str(tmp_path / "out"), "vllm").servable_as_is
    card = (tmp_path / "out" / "README.md").read_text()
    assert f'Converted exactly from an adapter trained with `init_lora_weights="{init}"`' in card
    # the same adapter as peft's own conversion
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    if init != "pissa_niter_2":  # peft rebuilds a deterministic initialisation when it loads
        assert (logits(peft_model, IDS) - ours).abs().max() < 1e-4


def test_conversion_equals_peft_conversion_and_loads_in_plain_peft(tmp_path):
    base = tiny_llama()
    model = pissa_like(base, "pissa", tmp_path)
    ours = logits(model, IDS)
    model.save_pretrained(tmp_path / "peft_converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "peft", initial_adapter=str(tmp_path / "init"))
    theirs, mine = served_deltas(tmp_path / "peft_converted", "vllm"), served_deltas(tmp_path / "out", "vllm")
    assert theirs.keys() == mine.keys()
    assert max((theirs[k] - mine[k]).abs().max().item() for k in theirs) < 1e-6
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    assert (logits(loaded, IDS) - ours).abs().max() < 1e-4
    assert check_serving(str(tmp_path / "out"), "peft").servable_as_is


def test_card_of_an_unconverted_adapter_says_how_to_serve_it(tmp_path):
    base = tiny_llama()
    pissa_like(base, "pissa_niter_2", tmp_path)
    write_model_card(str(tmp_path / "a"))
    card = (tmp_path / "a" / "README.md").read_text()
    assert "**The base weights changed in training.**" in card
    assert "| vLLM | needs `hf_lorax.export --initial_adapter` |" in card and "| peft | needs" in card
    # peft rebuilds PiSSA itself: loads as is there, with the reason in the report
    pissa_like(base, "pissa", tmp_path / "p")
    report = check_serving(str(tmp_path / "p" / "a"), "peft")
    assert report.servable_as_is and "runs that initialisation again" in str(report)
    out = export_adapter(str(tmp_path / "p" / "a"), str(tmp_path / "p_peft"), "peft")
    assert "runs the initialisation again" in out.summary()


def test_loftq_and_wrong_initial_adapters_are_refused_with_the_reason(tmp_path):
    base = tiny_llama()
    pissa_like(base, "pissa", tmp_path)
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}))
    report = check_serving(str(tmp_path / "a"), "peft")
    assert not report.servable_as_is and "No LoRA of the original base reproduces it" in str(report)
    with pytest.raises(ValueError, match="init_lora_weights='loftq'.*No LoRA of the original base"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "o1"), "vllm", initial_adapter=str(tmp_path / "init"))
    write_model_card(str(tmp_path / "a"))
    assert "| vLLM | cannot be served exactly |" in (tmp_path / "a" / "README.md").read_text()
    config_path.write_text(json.dumps(config))

    other = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \[2, 32\], the trained adapter's \[4, 32\]"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "o2"), "vllm", initial_adapter=str(tmp_path / "r2"))
    with pytest.raises(ValueError, match="--initial_adapter is for adapters whose initialisation changed the base"):
        export_adapter(str(tmp_path / "r2"), str(tmp_path / "o3"), "vllm", initial_adapter=str(tmp_path / "init"))
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_cli_refuses_in_one_line_and_converts_with_initial_adapter(tmp_path, capsys):
    pissa_like(tiny_llama(), "pissa", tmp_path)
    assert export_main([str(tmp_path / "a"), str(tmp_path / "out"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: init_lora_weights='pissa'")
    assert export_main([str(tmp_path / "a"), str(tmp_path / "out"), "--engine", "vllm",
                        "--initial_adapter", str(tmp_path / "init")]) == 0
    assert "converted from init_lora_weights='pissa'" in capsys.readouterr().out


def test_get_model_loads_what_peft_rebuilds_and_refuses_the_rest(tmp_path):
    from hf_lorax import get_model

    base = tiny_llama()
    ours = logits(pissa_like(base, "pissa", tmp_path / "p"), IDS)
    assert (logits(get_model(str(tmp_path / "p" / "a"), model=copy.deepcopy(base), is_trainable=False), IDS) - ours).abs().max() < 1e-4
    pissa_like(base, "pissa_niter_2", tmp_path / "n")
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_2'.*does not rebuild the same base.*--initial_adapter"):
        get_model(str(tmp_path / "n" / "a"), model=copy.deepcopy(base))


def test_merged_export_of_a_converted_adapter_is_the_trained_model(tmp_path):
    from transformers import LlamaForCausalLM

    base = tiny_llama()
    ours = logits(pissa_like(base, "pissa_niter_2", tmp_path), IDS)
    with pytest.raises(ValueError, match="a merge adds it to the original weights"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "m0"), "vllm", merge=True, base_model=copy.deepcopy(base))
    export_adapter(str(tmp_path / "a"), str(tmp_path / "m"), "vllm", merge=True, base_model=copy.deepcopy(base),
                   initial_adapter=str(tmp_path / "init"))
    assert (logits(LlamaForCausalLM.from_pretrained(tmp_path / "m").eval(), IDS) - ours).abs().max() < 1e-4


def test_glue_init_adapter_with_a_changed_base_is_refused(tmp_path, capsys):
    from hf_lorax_paper import experiment
    from hf_lorax_paper.tasks.glue import GluePlugin

    pissa_like(tiny_llama(), "pissa", tmp_path)
    code = experiment.main(GluePlugin(), ["--task", "sst2", "--model_name_or_path", "unused", "--init_adapter",
                                          str(tmp_path / "a"), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "init_lora_weights='pissa', which changed its base" in err
    assert not (tmp_path / "run").exists()
