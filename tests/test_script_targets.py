"""The task scripts on any model: the paper's targets (the attention's query and value) found in every causal and
encoder architecture of the zoo matrix, the scripts end to end on one tiny model per layout family, the override
flags, what results.json / results.md / the card say about the model that ran, and the one-line errors."""

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
import zoo
from conftest import randomize_adapters
from safetensors.torch import load_file
from test_e2e import _args as e2e_args
from test_e2e import _rows, write_csv
from test_e2e import build_tokenizer as bpe_tokenizer
from test_glue import TASKS, to_argv, write_glue

from hf_lorax import LoRAConfig, get_model, resolve
from hf_lorax_paper import experiment
from hf_lorax_paper.experiment import MethodArguments
from hf_lorax_paper.targets import PAPER_CHOICE, find_targets, resolve_targets, same_model
from hf_lorax_paper.tasks import e2e as e2e_task
from hf_lorax_paper.tasks import glue as glue_task
from hf_lorax_paper.tasks.e2e import E2EPlugin
from hf_lorax_paper.tasks.glue import GluePlugin
from hf_lorax_paper.tasks.synthetic import build_tokenizer as word_tokenizer

CELLS = [c for c in zoo.all_cells() if c.task in ("SEQ_CLS", "CAUSAL_LM")]
QV = ("q_proj", "v_proj")
# The oracle, written from each architecture's attention code: separate query/value layers ...
SEPARATE = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": QV, "opt": QV, "gptj": QV, "gpt_neo": QV, "llama": QV, "llama4": QV,
    "mistral": QV, "mixtral": QV, "stablelm": QV, "phi": QV, "gemma": QV, "gemma2": QV, "gemma3_text": QV,
    "qwen2": QV, "qwen3": QV, "nemotron_h": QV, "bert": ("query", "value"), "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"), "electra": ("query", "value"), "layoutlm": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"), "distilbert": ("q_lin", "v_lin"),
}
# ... the fused projection whose q and v slices are adapted ...
FUSED = {"gpt2": "c_attn", "gpt_bigcode": "c_attn", "bloom": "query_key_value", "gpt_neox": "query_key_value",
         "falcon": "query_key_value", "mpt": "Wqkv", "codegen": "qkv_proj", "deberta": "in_proj", "phi3": "qkv_proj"}
# ... and RWKV, which has no query: peft's default targets, said so.
PEFT_DEFAULT = {"rwkv": ("key", "value", "receptance", "output")}
# Architectures the issue names that the zoo matrix does not build (peft has no default targets for them).
EXTRA = {
    "phi3": ("CAUSAL_LM", "Phi3ForCausalLM", lambda: transformers.Phi3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "distilbert": ("SEQ_CLS", "DistilBertForSequenceClassification", lambda: transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3)),
}


def _cases():
    return [(c.model_type, c.task, c.class_name) for c in CELLS] + [(mt, task, cls) for mt, (task, cls, _) in EXTRA.items()]


def _build(model_type, task, class_name, eager=False):
    torch.manual_seed(0)
    config = EXTRA[model_type][2]() if model_type in EXTRA else zoo.tiny_config(zoo.Cell(model_type, task, class_name))
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return zoo.no_dropout(getattr(transformers, class_name)._from_config(config, **kwargs))


@pytest.mark.parametrize(("model_type", "task", "class_name"), _cases(), ids=lambda v: str(v))
def test_the_papers_targets_in_every_causal_and_encoder_architecture(model_type, task, class_name):
    """Found from the module tree alone (built on the meta device), and accepted by hf_lorax for that model."""
    with torch.device("meta"):
        model = _build(model_type, task, class_name)
    targets = find_targets(model)
    if model_type in SEPARATE:
        assert (targets.target_modules, targets.fused_slices) == (SEPARATE[model_type], None)
        assert targets.why == f"{', '.join(SEPARATE[model_type])}: {PAPER_CHOICE}"
    elif model_type in FUSED:
        suffix = FUSED[model_type]
        assert targets.target_modules == (suffix,) and PAPER_CHOICE in targets.why
        spec = targets.fused_slices[suffix]
        assert (spec["adapt"] if isinstance(spec, dict) else spec) == ["q", "v"]
    else:
        assert targets.target_modules == PEFT_DEFAULT[model_type] and targets.fused_slices is None
        assert targets.why.endswith("peft's default targets for model_type 'rwkv', which has no attention query and "
                                    "value layers")
    num_labels = zoo.NUM_LABELS if task == "SEQ_CLS" else None
    plan = resolve(LoRAConfig(task_type=task, num_labels=num_labels, **targets.config_fields()), model)
    assert {name.rsplit(".", 1)[-1] for name in plan.modules} == set(targets.target_modules)
    if model_type in FUSED:
        assert all(m.slices is not None and m.slices.adapt == ("q", "v") for m in plan.modules.values())


FUSED_CASES = [case for case in _cases() if case[0] in FUSED and (case[1] == "CAUSAL_LM" or case[0] == "deberta")]


@pytest.mark.parametrize(("model_type", "task", "class_name"), FUSED_CASES, ids=lambda v: str(v))
def test_fused_targets_are_the_rows_the_attention_reads_as_q_and_v(model_type, task, class_name):
    """Checked through the model's behaviour, as tests/test_slice_layouts.py does for hf_lorax's own layouts:
    adapting the slice called ``v`` leaves the first layer's attention probabilities alone (they depend on q and
    k only) and changes the output; adapting ``q`` changes them. CodeGen ([q|v|k] in 4 groups) and DeBERTa
    (per head) are the layouts the harness states itself."""
    base = _build(model_type, task, class_name, eager=True).eval()
    suffix = FUSED[model_type]
    spec = find_targets(base).fused_slices[suffix]
    ids = torch.randint(3, zoo.VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))

    def forward(model):
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
        return out.logits, out.attentions[0]

    base_logits, base_attention = forward(base)
    for part, attention_changes in (("v", False), ("q", True)):
        only = {**spec, "adapt": [part]} if isinstance(spec, dict) else [part]
        config = LoRAConfig(task_type=task, num_labels=zoo.NUM_LABELS if task == "SEQ_CLS" else None, r=2,
                            target_modules=[suffix], fused_slices={suffix: only})
        model = get_model(config, model=copy.deepcopy(base))
        randomize_adapters(model, seed=5)
        logits, attention = forward(model.eval())
        assert (logits - base_logits).abs().max() > 1e-4, (model_type, part)
        changed = float((attention - base_attention).abs().max())
        assert (changed > 1e-4) == attention_changes, (model_type, part, changed)


# -- the scripts end to end on tiny models ----------------------------------------------------------------------


def _save(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _causal(kind: str, vocab: int, eos: int):
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    if kind == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common))
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, num_key_value_heads=2))


@pytest.fixture(scope="module")
def e2e_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("targets_e2e") / "trainset.csv", _rows())


@pytest.fixture(scope="module")
def causal_bases(tmp_path_factory):
    root, tokenizer = tmp_path_factory.mktemp("targets_causal"), bpe_tokenizer()
    return {kind: _save(root / f"tiny-{kind}", _causal(kind, len(tokenizer), tokenizer.eos_token_id), tokenizer)
            for kind in ("llama", "gpt_neox", "phi3")}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue(tmp_path_factory.mktemp("targets_glue"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))
    return _save(tmp_path_factory.mktemp("targets_bert") / "tiny-bert", model, tokenizer)


def _e2e(base, csv, out, **kw):
    options = dict(max_steps=2, per_device_train_batch_size=4, num_beams=1, max_new_tokens=6, max_eval_samples=2,
                   meteor=False, rank_utilization=False, logging_steps=1, **kw)
    return e2e_args(base, csv, out, **options)


def _glue(base, glue_dir, out, **kw):
    options = {"preset": "roberta-base/sst2", "model_name_or_path": base, "data_dir": str(glue_dir / TASKS["sst2"].folder),
               "output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 8, "max_length": 32,
               "rank_utilization": False, "use_cpu": True, "disable_tqdm": True, "report_to": "none", **kw}
    return to_argv(options)


def _saved_run(out: Path) -> tuple[dict, str, str, dict]:
    adapter = out / "adapter"
    return (json.loads((out / "results.json").read_text()), (out / "results.md").read_text(),
            (adapter / "README.md").read_text(), json.loads((adapter / "adapter_config.json").read_text()))


# kind: (target_modules, fused_slices, rows of the fused output the adapter leaves alone: k's)
E2E_FAMILIES = {
    "llama": (["q_proj", "v_proj"], None, None),  # separate q/v
    "gpt_neox": (["query_key_value"], {"query_key_value": ["q", "v"]}, 32),  # fused, interleaved per head
    "phi3": (["qkv_proj"], {"qkv_proj": ["q", "v"]}, 2 * 8),  # fused, grouped-query: 2 kv heads of width 8
}


@pytest.mark.parametrize("kind", list(E2E_FAMILIES))
def test_e2e_script_adapts_the_query_and_value_of_any_causal_lm(kind, causal_bases, e2e_csv, tmp_path, capsys):
    base = causal_bases[kind]
    modules, slices, k_rows = E2E_FAMILIES[kind]
    assert experiment.main(E2EPlugin(), _e2e(base, e2e_csv, tmp_path)) == 0
    saved, table, card, config = _saved_run(tmp_path)
    why = saved["targets"]["why"]
    assert f"[e2e] {base} ({kind}): adapting {why}" in capsys.readouterr().out  # the log says it
    assert why.startswith(modules[0]) and why.endswith(PAPER_CHOICE)
    assert (saved["model"], saved["model_type"]) == (base, kind)
    assert (saved["targets"]["target_modules"], saved["targets"]["fused_slices"]) == (modules, slices)
    assert sorted(config["target_modules"]) == modules
    # a tiny model of another architecture: GPT-2 medium's numbers are beside it, named, and not its reference
    assert saved["reference"] is None and saved["paper_rows"][0]["model"] == "GPT-2 medium"
    assert f"| tiny-{kind} (ours) | lora |" in table and "| paper, GPT-2 medium | LoRA | 0.35M |" in table
    assert "gpt2-medium/e2e (ours)" not in table and "(paper)" not in table
    assert f"| targets | {why} |" in card and "Reference numbers" not in card
    assert saved["hyperparameters"]["targets"] == why and "target_modules" not in saved["hyperparameters"]
    if slices:  # the saved B is dense and block-structured: exactly k's rows stay zero, q's and v's trained
        weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        for key in [k for k in weights if "lora_B" in k]:
            zero_rows = int((weights[key].abs().sum(dim=1) == 0).sum())
            assert zero_rows == k_rows, (key, zero_rows)


def test_glue_script_on_another_encoder_names_it_and_keeps_the_paper_apart(tiny_bert, glue_dir, tmp_path, capsys):
    assert experiment.main(GluePlugin(), _glue(tiny_bert, glue_dir, tmp_path)) == 0
    saved, table, card, config = _saved_run(tmp_path)
    assert f"adapting query, value: {PAPER_CHOICE}" in capsys.readouterr().out
    assert saved["model_type"] == "bert" and saved["targets"]["target_modules"] == ["query", "value"]
    assert saved["targets"]["modules_to_save"] == ["classifier"] and sorted(config["target_modules"]) == ["query", "value"]
    assert saved["reference"] is None and saved["paper"]["model"] == "RoBERTa base"
    assert "| roberta-base/sst2 | lora | tiny-bert | accuracy |" in table
    assert "| roberta-base/sst2 | LoRA | paper, RoBERTa base | accuracy | 95.1 | - | - |" in table
    assert "Reference numbers" not in card and f"| targets | query, value: {PAPER_CHOICE} |" in card


def test_target_flags_override_as_in_a_config(tiny_bert, glue_dir, tmp_path):
    argv = _glue(tiny_bert, glue_dir, tmp_path) + ["--target_modules", "query", "key", "--modules_to_save", "classifier"]
    assert experiment.main(GluePlugin(), argv) == 0
    saved, _, card, config = _saved_run(tmp_path)
    assert sorted(config["target_modules"]) == ["key", "query"] and config["modules_to_save"][0] == "classifier"
    why = "query, key: --target_modules; trained in full: classifier (--modules_to_save)"
    assert saved["targets"]["why"] == why and f"| targets | {why} |" in card


def _method(**flags) -> MethodArguments:
    return MethodArguments(**flags)


def test_fused_slices_and_target_modules_flags(tmp_path):
    gpt2 = str(tmp_path / "gpt2")
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64).save_pretrained(gpt2)
    targets, model_type = resolve_targets(gpt2, "CAUSAL_LM", None, _method())
    assert model_type == "gpt2" and targets.config_fields() == {
        "target_modules": ["c_attn"], "fused_slices": {"c_attn": ["q", "v"]}, "modules_to_save": None}
    assert targets.why == f"c_attn (q, v slices) of the fused projection: {PAPER_CHOICE}"
    targets, _ = resolve_targets(gpt2, "CAUSAL_LM", None, _method(fused_slices='{"c_attn": ["q", "k", "v"]}'))
    assert (targets.target_modules, targets.fused_slices) == (("c_attn",), {"c_attn": ["q", "k", "v"]})
    assert targets.why == "c_attn (q, k, v slices): the modules found in the model, slices from --fused_slices"
    targets, _ = resolve_targets(gpt2, "CAUSAL_LM", None, _method(target_modules=["c_attn", "c_proj"]))
    assert (targets.target_modules, targets.fused_slices) == (("c_attn", "c_proj"), None)  # a whole-module LoRA
    assert resolve_targets(gpt2, "CAUSAL_LM", None, _method(target_modules=["all-linear"]))[0].target_modules == "all-linear"


def test_the_paper_is_a_runs_reference_only_for_the_papers_model():
    assert same_model("roberta-base", "roberta-base") and same_model("FacebookAI/roberta-base", "roberta-base")
    assert same_model("/models/gpt2-medium/", "gpt2-medium")
    assert not same_model("distilroberta-base", "roberta-base") and not same_model("/tmp/tiny", "gpt2-medium")
    paper = {"source": "x", "model": "RoBERTa base", "method": "LoRA", "metrics": {"accuracy": 0.951}}
    run = {"preset": "roberta-base/sst2", "method": "lora", "model": "FacebookAI/roberta-base", "reference": paper,
           "paper": paper, "main_metric": {"name": "accuracy", "value": 0.94}}
    assert glue_task.results_table([run]).splitlines()[2:] == [
        "| roberta-base/sst2 | lora | FacebookAI/roberta-base | accuracy | 94.0 | 95.1 | -1.1 |"]
    e2e_row = {"model": "GPT-2 medium", "method": "LoRA", "trainable_params_m": 0.35, "BLEU": 70.4, "NIST": 8.85,
               "METEOR": 46.8, "ROUGE_L": 71.8, "CIDEr": 2.53}
    runs = [{"model": "/m/SmolLM2-135M", "method": m, "trainable_params": 1, "metrics": {}, "paper_rows": [e2e_row]}
            for m in ("lora", "dora")]
    assert e2e_task.results_table(runs).splitlines()[2:] == [
        "| SmolLM2-135M (ours) | lora | 1 | - | - | - | - | - |", "| SmolLM2-135M (ours) | dora | 1 | - | - | - | - | - |",
        "| paper, GPT-2 medium | LoRA | 0.35M | 70.4 | 8.85 | 46.8 | 71.8 | 2.53 |"]  # once, named by its model


# -- one-line errors ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mamba(tmp_path_factory):
    """A model without attention (and without peft default targets): only its config is read before the error."""
    path = tmp_path_factory.mktemp("targets_mamba") / "tiny-mamba"
    transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4).save_pretrained(path)
    return str(path)


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("base", "flags", "message"), [
    ("mamba", [], "error: found no attention query/value layers in {base} (model_type 'mamba'); its linear layers "
                  "(by suffix): ['in_proj', 'x_proj', 'dt_proj', 'out_proj', 'lm_head']. Choose with --target_modules"),
    ("llama", ["--fused_slices", "{c_attn: [q]}"], "error: --fused_slices '{c_attn: [q]}' is not valid JSON"),
    ("llama", ["--fused_slices", '["q", "v"]'], "error: --fused_slices '[\"q\", \"v\"]': expected a JSON object"),
    ("llama", ["--fused_slices", '{"c_attn": ["q", "x"]}'], "error: --fused_slices: fused_slices['c_attn']: slice "
                                                           "names ['x'] are not valid; choose a non-empty subset"),
    ("llama", ["--target_modules", "c_attn"], "error: target_modules=['c_attn'] matched no module of the model. "
                                              "Layer names it could target (by suffix): ['embed_tokens', 'q_proj', 'k_proj'"),
    ("llama", ["--target_modules", "q_proj", "--method", "full"],
     "error: --target_modules chooses what an adapter adapts; --method full trains no adapter."),
])
def test_target_errors_are_one_line_and_write_nothing(base, flags, message, tiny_mamba, causal_bases, e2e_csv,
                                                      tmp_path, capsys):
    path = tiny_mamba if base == "mamba" else causal_bases[base]
    code = experiment.main(E2EPlugin(), _e2e(path, e2e_csv, tmp_path / "out") + flags)
    line = _one_line(capsys)
    assert code == 2 and line.startswith(message.replace("{base}", path)), line
    assert not (tmp_path / "out").exists()

