"""Adapters whose initialisation changed the base (PiSSA, OLoRA, ...): flagged, refused with the way out, and served
exactly once peft's own conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``) has run on the
model ``get_model`` returned.

The reference for "exact" is independent of hf_lorax: the trained model itself (on its residual base) and vLLM's
arithmetic on the *original* base (tests/engine_reference.py).
"""

import copy
import json

import pytest
import torch
from engine_reference import serve, served_deltas
from peft import LoraConfig, PeftModel, get_peft_model
from test_export import IDS, logits, tiny_llama

from hf_lorax import DoRAConfig, LoRAConfig, check_serving, export_adapter, get_model, write_model_card
from hf_lorax.export.__main__ import main as export_main

TARGETS = ["q_proj", "v_proj"]
CONVERSION = "path_initial_model_for_weight_conversion=INIT_DIR"


def pissa_like(base, init, folder, plain_peft=False, config_class=LoRAConfig, **kwargs):
    """An adapter with ``init_lora_weights=init`` (hf_lorax's, or plain peft's): its initial state saved to
    ``folder/init`` (as peft's docs do), then "trained" (factors moved) and saved to ``folder/a``; returns the
    trained model."""
    if plain_peft:
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=init, **kwargs))
    else:
        model = get_model(config_class(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init,
                                       task_type="CAUSAL_LM", **kwargs), copy.deepcopy(base))
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


def convert(model, folder):
    """peft's conversion to a LoRA of the original base, saved to ``folder/converted``."""
    model.save_pretrained(folder / "converted", path_initial_model_for_weight_conversion=str(folder / "init"))
    return folder / "converted"


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_flagged_as_saved_and_served_exactly_after_peft_conversion(init, tmp_path):
    base = tiny_llama()
    model = pissa_like(base, init, tmp_path, rank_map={"layers.0.self_attn.q_proj": 2})
    ours = logits(model, IDS)
    # the bug: vLLM adds s·BA to the original weights
    assert (logits(serve(base, tmp_path / "a", "vllm"), IDS) - ours).abs().max() > 0.01  # exact is < 1e-4
    report = check_serving(str(tmp_path / "a"), "vllm")
    assert not report.servable_as_is and f"init_lora_weights={init!r}" in str(report) and CONVERSION in str(report)
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}.*{CONVERSION}"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "refused"), "vllm")
    assert not (tmp_path / "refused").exists()

    converted = convert(model, tmp_path)
    config = json.loads((converted / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    result = export_adapter(str(converted), str(tmp_path / "out"), "vllm")
    assert result.rank == 8
    assert (logits(serve(base, tmp_path / "out", "vllm"), IDS) - ours).abs().max() < 1e-4
    assert check_serving(str(tmp_path / "out"), "vllm").servable_as_is
    assert "The base weights changed in training" not in (converted / "README.md").read_text()
    # the converted adapter loads exactly on the original base, in get_model and in plain peft
    for loaded in (get_model(str(converted), model=copy.deepcopy(base), is_trainable=False),
                   PeftModel.from_pretrained(copy.deepcopy(base), converted)):
        assert (logits(loaded, IDS) - ours).abs().max() < 1e-4


def test_hf_lorax_models_convert_as_plain_peft_models_do(tmp_path):
    base = tiny_llama()
    torch.manual_seed(0)
    ours = convert(pissa_like(base, "pissa", tmp_path / "h"), tmp_path / "h")
    torch.manual_seed(0)
    theirs = convert(pissa_like(base, "pissa", tmp_path / "p", plain_peft=True), tmp_path / "p")
    theirs, mine = served_deltas(theirs, "vllm"), served_deltas(ours, "vllm")
    assert theirs.keys() == mine.keys()
    assert max((theirs[k] - mine[k]).abs().max().item() for k in theirs) < 1e-6


def test_dora_on_a_changed_base_is_not_converted_and_says_why(tmp_path):
    """peft's conversion of a DoRA adapter is not the trained model (its weight norm was taken on the changed base)
    and peft raises nothing: the save refuses it, and no message recommends it."""
    base = tiny_llama()
    model = pissa_like(base, "pissa", tmp_path, config_class=DoRAConfig)
    # the wrong result the save refuses to write: peft's conversion, loaded on the original base
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    peft_model.save_pretrained(tmp_path / "peft_converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    wrong = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft_converted")
    assert (logits(wrong, IDS) - logits(model, IDS)).abs().max() > 0.01
    with pytest.raises(ValueError, match="DoRA adapter: No LoRA of the original base.*exact for plain LoRA only"):
        convert(model, tmp_path)
    assert not (tmp_path / "converted").exists()
    report = check_serving(str(tmp_path / "a"), "vllm")
    assert "exact for plain LoRA only" in str(report) and CONVERSION not in str(report)
    with pytest.raises(ValueError, match="No LoRA of the original base reproduces it: DoRA"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "out"), "vllm")
    write_model_card(str(tmp_path / "a"))
    assert "| vLLM | cannot be served exactly |" in (tmp_path / "a" / "README.md").read_text()
    with pytest.warns(UserWarning, match="does not rebuild the same base. Instead, merge it .merge_and_unload. where"):
        pissa_like(base, "pissa_niter_2", tmp_path / "n", config_class=DoRAConfig)  # said before training too
    with pytest.raises(ValueError, match="does not rebuild the same base. Instead, merge it .merge_and_unload. where"):
        get_model(str(tmp_path / "n" / "a"), model=copy.deepcopy(base))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda", "lora_ga"])
def test_rslora_with_per_module_ranks_is_refused_before_training(init):
    """peft's conversion, the only way to serve such an adapter, refuses rsLoRA with rank/alpha patterns: refused
    when the model is built, for every initialisation that needs it (not after training)."""
    for maps in ({"rank_map": {"layers.0.self_attn.q_proj": 2}}, {"rank_pattern": {"q_proj": 2}}):
        with pytest.raises(ValueError, match=f"init_lora_weights={init!r} with use_rslora and per-module ranks"):
            get_model(LoRAConfig(r=4, target_modules=TARGETS, init_lora_weights=init, use_rslora=True,
                                 task_type="CAUSAL_LM", **maps), tiny_llama())


def test_card_of_an_unconverted_adapter_says_how_to_serve_it(tmp_path):
    base = tiny_llama()
    pissa_like(base, "pissa_niter_2", tmp_path, plain_peft=True)
    write_model_card(str(tmp_path / "a"))
    card = (tmp_path / "a" / "README.md").read_text()
    assert "**The base weights changed in training.**" in card and CONVERSION in card
    assert "| vLLM | needs peft's conversion |" in card and "| peft | needs" in card
    # peft rebuilds PiSSA itself: loads as is there, with the reason in the report
    pissa_like(base, "pissa", tmp_path / "p", plain_peft=True)
    report = check_serving(str(tmp_path / "p" / "a"), "peft")
    assert report.servable_as_is and "runs that initialisation again" in str(report)
    out = export_adapter(str(tmp_path / "p" / "a"), str(tmp_path / "p_peft"), "peft")
    assert "runs the initialisation again" in out.summary()


def test_loftq_is_refused_with_the_reason(tmp_path):
    pissa_like(tiny_llama(), "pissa", tmp_path, plain_peft=True)
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}))
    report = check_serving(str(tmp_path / "a"), "peft")
    assert not report.servable_as_is and "No LoRA of the original base reproduces it" in str(report)
    with pytest.raises(ValueError, match="init_lora_weights='loftq'.*No LoRA of the original base"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "o1"), "vllm")
    write_model_card(str(tmp_path / "a"))
    assert "| vLLM | cannot be served exactly |" in (tmp_path / "a" / "README.md").read_text()
    assert not (tmp_path / "o1").exists()


def test_cli_refuses_in_one_line_with_the_conversion(tmp_path, capsys):
    pissa_like(tiny_llama(), "pissa", tmp_path, plain_peft=True)
    assert export_main([str(tmp_path / "a"), str(tmp_path / "out"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: init_lora_weights='pissa'") and CONVERSION in err


def test_an_init_that_will_not_reload_is_said_before_training(tmp_path):
    """get_model and peft's hook warn when the model is built, while saving the adapter as initialised (what peft's
    conversion needs) is still possible; what peft rebuilds (PiSSA with full SVD) is not warned about."""
    import warnings

    base = tiny_llama()
    config = LoRAConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa_niter_2")
    for build in (lambda: get_model(config, copy.deepcopy(base)), lambda: get_peft_model(copy.deepcopy(base), config)):
        with pytest.warns(UserWarning, match=r"'pissa_niter_2' changes the base.*before training \(INIT_DIR"):
            build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_model(LoRAConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"), copy.deepcopy(base))


def test_get_model_loads_what_peft_rebuilds_and_refuses_the_rest(tmp_path):
    base = tiny_llama()
    ours = logits(pissa_like(base, "pissa", tmp_path / "p", plain_peft=True), IDS)
    assert (logits(get_model(str(tmp_path / "p" / "a"), model=copy.deepcopy(base), is_trainable=False), IDS) - ours).abs().max() < 1e-4
    pissa_like(base, "pissa_niter_2", tmp_path / "n", plain_peft=True)
    with pytest.raises(ValueError, match=rf"init_lora_weights='pissa_niter_2'.*does not rebuild the same base.*{CONVERSION}"):
        get_model(str(tmp_path / "n" / "a"), model=copy.deepcopy(base))


def test_merged_export_of_a_converted_adapter_is_the_trained_model(tmp_path):
    from transformers import LlamaForCausalLM

    base = tiny_llama()
    model = pissa_like(base, "pissa_niter_2", tmp_path)
    ours = logits(model, IDS)
    with pytest.raises(ValueError, match="a merge adds it to the original weights"):
        export_adapter(str(tmp_path / "a"), str(tmp_path / "m0"), "vllm", merge=True, base_model=copy.deepcopy(base))
    export_adapter(str(convert(model, tmp_path)), str(tmp_path / "m"), "vllm", merge=True, base_model=copy.deepcopy(base))
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
