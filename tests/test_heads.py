"""Task heads, default target modules and the logits-free decision (issue 21 items 1, 3, 5), on named cases.

The zoo matrix (tests/test_zoo.py) runs every architecture; this file pins the cases by name: what is trained
in full besides the adapters, what peft's suffix matching would hit, which targets an architecture gets by
default, and why a causal LM keeps its own loss.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import zoo
import zoo_run
from peft import LoraConfig, get_peft_model
from peft.utils import ModulesToSaveWrapper

from hf_lorax import LoRAConfig, describe, get_model
from hf_lorax.loss import logits_free_unsupported_reason
from hf_lorax.plan import find_task_heads, resolve
from hf_lorax.task_types import PEFT_ADDED_HEADS

CELLS = {c.id: c for c in zoo.all_cells()}


def _distilbert(cls=tf.DistilBertForSequenceClassification):
    torch.manual_seed(0)
    return cls(tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=64, num_labels=3)).eval()


@pytest.mark.parametrize(("cell_id", "heads"), [
    ("bert-SEQ_CLS", ["classifier"]),  # not its parameter-free ``dropout``
    ("bert-TOKEN_CLS", ["classifier"]),
    ("bert-QUESTION_ANS", ["qa_outputs"]),
    ("deberta-v2-SEQ_CLS", ["pooler", "classifier"]),  # DeBERTa's pooler sits outside the body and trains
    ("electra-SEQ_CLS", ["classifier"]),
    ("gpt2-SEQ_CLS", ["score"]),
    ("llama-TOKEN_CLS", ["score"]),
    ("llama-QUESTION_ANS", ["qa_outputs"]),  # body ``transformer``, not ``model``
    ("mt5-QUESTION_ANS", ["qa_outputs"]),  # no body child: shared/encoder/decoder sit on the task class itself
    ("t5-SEQ_CLS", ["classification_head"]),
])
def test_task_heads_are_exactly_the_modules_holding_the_heads_parameters(cell_id, heads):
    assert find_task_heads(zoo.build_base(CELLS[cell_id])) == heads


def test_distilbert_head_is_pre_classifier_and_classifier():
    assert find_task_heads(_distilbert()) == ["pre_classifier", "classifier"]


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_bert_family_classifier_trains_and_saves_only_its_head(task, tmp_path):
    """The issue's TypeError: ``dropout`` in modules_to_save also hit every ``lora_dropout`` ModuleDict."""
    cell = CELLS[f"bert-{task}"]
    model = get_model(LoRAConfig(task_type=task, num_labels=3, target_modules=["query", "value"]),
                      model=zoo.build_base(cell))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrapped == ["base_model.model.classifier"]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert "dropout" not in saved and "classifier" in saved


def test_distilbert_get_model_wraps_both_head_layers():
    model = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=3, target_modules=["q_lin", "v_lin"]),
                      model=_distilbert())
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    assert wrapped == ["base_model.model.classifier", "base_model.model.pre_classifier"]


def test_a_modules_to_save_entry_hitting_adapter_internals_is_an_error():
    config = LoRAConfig(task_type="SEQ_CLS", num_labels=3, target_modules=["query"], modules_to_save=["dropout"])
    with pytest.raises(ValueError, match=r"'dropout'.*lora_dropout.*name suffix"):
        resolve(config, zoo.build_base(CELLS["bert-SEQ_CLS"]))


def test_a_modules_to_save_entry_matching_nothing_is_an_error():
    config = LoRAConfig(task_type="SEQ_CLS", num_labels=3, target_modules=["query"], modules_to_save=["clasifier"])
    with pytest.raises(ValueError, match=r"'clasifier' matches no module.*'classifier'"):
        resolve(config, zoo.build_base(CELLS["bert-SEQ_CLS"]))


@pytest.mark.parametrize(("peft_class", "task"), [
    ("PeftModelForSequenceClassification", "SEQ_CLS"), ("PeftModelForTokenClassification", "TOKEN_CLS"),
    ("PeftModelForQuestionAnswering", "QUESTION_ANS"),
])
def test_peft_added_heads_table_matches_peft(peft_class, task):
    """hf_lorax checks the names peft's task classes append to modules_to_save; the table must be peft's."""
    cell = CELLS[f"bert-{task}"]
    model = get_peft_model(zoo.build_base(cell), LoraConfig(task_type=task, target_modules=["query"]))
    assert type(model).__name__ == peft_class
    assert tuple(model.peft_config["default"].modules_to_save) == PEFT_ADDED_HEADS[task]


def test_default_targets_are_peft_default_for_the_architecture():
    model = zoo.build_base(CELLS["llama-CAUSAL_LM"])
    plan = resolve(LoRAConfig(task_type="CAUSAL_LM"), model)
    assert plan.default_targets_for == "llama"
    assert set(plan.target_modules) == {"q_proj", "v_proj"}
    assert sorted({n.rsplit(".", 1)[-1] for n in plan.modules}) == ["q_proj", "v_proj"]
    # exactly the modules plain peft adapts with no target_modules
    peft_model = get_peft_model(zoo.build_base(CELLS["llama-CAUSAL_LM"]), LoraConfig(task_type="CAUSAL_LM"))
    assert set(plan.modules) == {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                                 if hasattr(m, "lora_A")}


def test_no_default_targets_error_names_the_architecture_and_its_layers():
    with pytest.raises(ValueError, match=r"no default LoRA targets for model_type 'distilbert'.*'q_lin'"):
        resolve(LoRAConfig(task_type="SEQ_CLS", num_labels=3), _distilbert())


def test_a_wrong_target_names_the_architecture_layers():
    with pytest.raises(ValueError, match=r"\['q_proj'\] matched no module.*'query', 'key', 'value'"):
        resolve(LoRAConfig(task_type="SEQ_CLS", num_labels=3, target_modules=["q_proj"]),
                zoo.build_base(CELLS["bert-SEQ_CLS"]))


def test_describe_shows_heads_targets_and_loss():
    cls_model = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=3), model=zoo.build_base(CELLS["bert-SEQ_CLS"]))
    report = describe(cls_model)
    classifier = zoo.build_base(CELLS["bert-SEQ_CLS"]).classifier
    assert report.heads == {"classifier": sum(p.numel() for p in classifier.parameters())}
    assert "peft's default for model_type 'bert'" in report.targets and "'query'" in report.targets
    text = str(report)
    assert "trained in full besides the adapters: classifier (99 params)" in text
    lm = get_model(LoRAConfig(task_type="CAUSAL_LM"), model=zoo.build_base(CELLS["llama-CAUSAL_LM"]))
    assert describe(lm).loss.startswith("logits-free")
    bert_lm = get_model(LoRAConfig(task_type="CAUSAL_LM"), model=zoo.build_base(CELLS["bert-CAUSAL_LM"]))
    assert describe(bert_lm).loss == ("the model's own (its LM head applies a transform before the output "
                                      "projection)")


@pytest.mark.parametrize(("cell_id", "overrides", "reason"), [
    ("gemma2-CAUSAL_LM", {}, "final_logit_softcapping=30.0"),
    ("mixtral-CAUSAL_LM", {"output_router_logits": True}, "router auxiliary loss"),
    ("bert-CAUSAL_LM", {}, "transform before the output projection"),
    ("electra-CAUSAL_LM", {}, "['generator_predictions'] besides"),
    ("llama-CAUSAL_LM", {}, None),
    ("rwkv-CAUSAL_LM", {}, None),
])
def test_logits_free_support_is_read_from_the_model(cell_id, overrides, reason):
    model = zoo.build_base(CELLS[cell_id])
    for key, value in overrides.items():
        setattr(model.config, key, value)
    got = logits_free_unsupported_reason(model)
    assert got is None if reason is None else reason in got


def test_every_buildable_cell_is_in_a_test_file():
    grouped = {t for types in zoo.GROUPS.values() for t in types}
    built = {c.model_type for c in zoo.all_cells()}
    assert built == grouped, sorted(built ^ grouped)
    assert len(built) >= 30


MIXTRAL = [pytest.param(CELLS[f"mixtral-{task}"], method) for task in ("SEQ_CLS", "CAUSAL_LM")
           for method in ("lora", "dora")]


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """The Mixtral cells with explicit targets, and a llama adapter saved with its ``lora_B`` zeroed afterwards,
    reloaded by plain peft in ONE process (``zoo_run.run_matrix``; it starts torch, transformers and peft once)."""
    from safetensors.torch import load_file, save_file

    workdir = tmp_path_factory.mktemp("heads_matrix")
    try:
        zeroed = zoo_run.run_cell(CELLS["llama-SEQ_CLS"], "lora", workdir)
    except Exception as exc:  # re-raised by the test that uses it
        return {"zeroed": exc, **zoo_run.run_matrix(MIXTRAL, workdir, explicit_targets=True)}
    weights_file = Path(zeroed["adapter"]) / "adapter_model.safetensors"
    weights = load_file(weights_file)
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, weights_file)
    zeroed["id"] += "-zeroed"
    return {"zeroed": zeroed, **zoo_run.run_matrix(MIXTRAL, workdir, explicit_targets=True, extra=[zeroed])}


def test_mixtral_with_explicit_targets_matches_plain_peft(reloaded):
    """Mixtral's matrix cells are xfail: plain peft drops its default targets. With them given explicitly, the
    same checks (plain peft, one step, save, both reloads) run on Mixtral."""
    for param in MIXTRAL:
        zoo_run.check_case(reloaded, *param.values)
    assert reloaded["mixtral-CAUSAL_LM-lora"]["logits_free"]


def test_readme_table_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert zoo.readme_table() in readme, "regenerate the README's zoo table: python tests/zoo.py"


def test_a_zeroed_lora_b_fails_the_plain_peft_reload_check(reloaded):
    """The matrix's reload check has teeth: the same saved adapter with lora_B zeroed is caught."""
    if isinstance(reloaded["zeroed"], Exception):
        raise reloaded["zeroed"]
    result = reloaded["zeroed"]["peft"]
    assert result["max_diff"] > zoo.EFFECT > zoo.TOL


def test_a_model_without_a_known_body_keeps_peft_s_own_head_names():
    """Not a transformers task model: no head is found, and peft's own ``classifier`` may wrap what it finds."""

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.classifier = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    plan = resolve(LoRAConfig(task_type="SEQ_CLS", target_modules=["encoder"]), Custom())
    assert plan.modules_to_save is None and list(plan.modules) == ["encoder"]
