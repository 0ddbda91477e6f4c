"""The base model: loaded for a config (:func:`load_base_model`), then checked and prepared once (:func:`prepare`).

:func:`injection_config` is what a model needs whoever injects (``get_model``, the peft hook for
``peft.get_peft_model``, TRL and transformers): the config checked against it and resolved, hf_lorax's layers
registered, then the changes training needs. :func:`prepare` is ``get_model``'s: the label count checked first, and
the logits-free loss last. Either runs every check that can reject the config before any change to the model.
"""

from __future__ import annotations

import os
from typing import Any

from peft import PeftConfig
from torch import nn

from .config import LoRAConfig
from .integrations.peft_api import register_layers
from .layers import layer_mapping
from .loss import declare_mean_loss, prepare_loss
from .plan import find_task_heads, resolve
from .quantization import disable_cpu_repacking
from .task_types import AUTO_CLASSES, HEAD_TASK_TYPES, LABELLED_TASK_TYPES, task_name


def prepare(config: LoRAConfig, model: nn.Module, logits_free_loss: bool = True) -> LoRAConfig:
    """Check ``config`` against ``model``, change ``model`` as training needs, return the resolved config peft injects.

    First every check that can reject the config for this model (the head's label count; then, in
    :func:`injection_config`, the plan: targets, maps, slices, heads, a quantized base for QLoRA; and the peft
    internals hf_lorax's layers build on, as they are registered on the resolved copy peft receives), so nothing is
    changed before a typo is reported; then every change (a quantized base's CPU repacking off, the Trainer's loss
    normalisation for task heads, a pad token for GPT-2-style classification heads, the causal-LM loss). The user's
    config is never changed. Runs once per model.

    A quantized base is not given to peft's ``prepare_model_for_kbit_training``: it casts every non-quantized
    parameter to float32 (peft#3265, #1149), which doubles a bf16 model's embeddings, norms and head; peft freezes
    the base anyway, and transformers' ``gradient_checkpointing_enable`` turns on the input gradients reentrant
    checkpointing needs (a hook installed here would break ``torch.compile`` graphs for every run).
    """
    task, model_config = task_name(config.task_type), getattr(model, "config", None)
    labels = getattr(model_config, "num_labels", None)
    if config.num_labels and task in LABELLED_TASK_TYPES and labels not in (None, config.num_labels):
        raise ValueError(f"config.num_labels={config.num_labels} but the model's head has {labels} labels. "
                         "Load the model with the same num_labels, or let get_model load it.")
    resolved = injection_config(config, model)
    prepare_loss(model, task, logits_free_loss)
    return resolved


def injection_config(config: LoRAConfig, model: nn.Module) -> LoRAConfig:
    """The config peft should inject into ``model`` (the peft hook's one call): ``config`` itself when it carries a
    plan already (:func:`prepare` made it), else its resolved copy; hf_lorax's layers registered on it. The model is
    the user's: only what training it needs is changed (a quantized base's CPU repacking off: with it,
    ``peft.get_peft_model`` / TRL QLoRA on a CPU with AVX512-BF16 failed after an evaluation; a task head's loss
    declared a mean; an unset pad id of a classifier, which the resolved config records so a reload uses it too)."""
    resolved = config if config.resolved_plan is not None else config.with_plan(resolve(config, model))
    register_layers(resolved, layer_mapping())
    disable_cpu_repacking(model)
    if resolved.resolved_plan.modules_to_save:
        declare_mean_loss(model)
    if task_name(resolved.task_type) == "SEQ_CLS" and (model_config := getattr(model, "config", None)) is not None:
        # a GPT-2-style head finds each row's last token by the pad id: the one recorded, else eos
        if getattr(model_config, "pad_token_id", None) is None:
            eos = getattr(model_config, "eos_token_id", None)  # a list in some configs: its first
            model_config.pad_token_id = resolved.pad_token_id if resolved.pad_token_id is not None else (
                eos[0] if isinstance(eos, (list, tuple)) else eos)
        resolved.pad_token_id = model_config.pad_token_id
    return resolved


def load_base_model(config: PeftConfig, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load ``config.base_model_name_or_path`` with the Auto class matching ``config.task_type``.

    Weights the checkpoint does not hold are initialised randomly by transformers, differently at every load. In a
    task model, outside the head that trains and is saved with the adapter (``config.modules_to_save``, else the
    head :func:`~hf_lorax.plan.find_task_heads` finds for a classification / QA task), they would make every reload
    a different model than the one trained (a BERT classifier from a checkpoint without ``bert.pooler``, a causal
    LM without its untied ``lm_head``): that is a ``ValueError`` naming them.
    """
    import transformers

    name = config.base_model_name_or_path
    if not name:
        raise ValueError("config.base_model_name_or_path is empty: set it, or pass model=... to get_model.")
    if _looks_like_path(name) and not os.path.isdir(name):
        raise FileNotFoundError(f"Base model directory {name!r} does not exist.")
    if os.path.isfile(os.path.join(name, "adapter_config.json")):  # transformers would load its base and attach it
        raise ValueError(f"{name!r} is a saved adapter (it has adapter_config.json), not a base model: pass the base "
                         "model it was trained on (its adapter_config.json names it as base_model_name_or_path).")
    task = task_name(config.task_type)
    auto = getattr(transformers, AUTO_CLASSES[task])
    # an hf_lorax config's own (a QLoRA config's quantization), then the caller's
    kwargs = {**getattr(config, "base_model_kwargs", dict)(), **from_pretrained_kwargs}
    if task in LABELLED_TASK_TYPES and getattr(config, "num_labels", None):
        # a checkpoint whose head has another label count: the head is re-initialised and trained anyway
        kwargs = {"num_labels": config.num_labels, "ignore_mismatched_sizes": True, **kwargs}
    try:
        model, loading = auto.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " HF_HUB_OFFLINE=1 is set, so only local directories and the local cache are used." if offline else ""
        raise OSError(f"Could not load base model {name!r} with {auto.__name__}: {exc}.{hint}") from exc
    if task in (None, "FEATURE_EXTRACTION"):  # a bare model: which of its outputs count is the user's to say
        return model
    # the heads the plan trains and saves: the config's, else (task heads only, as plan.resolve) the ones it finds
    heads = list(config.modules_to_save or (find_task_heads(model) if task in HEAD_TASK_TYPES else ()))
    random = sorted(key for key in loading["missing_keys"] if not any(
        module == head or module.endswith("." + head) for head in heads for module in _parents(key)))
    if random:
        modules = sorted({key.rsplit(".", 1)[0] for key in random})
        raise ValueError(f"Base model {name!r} has no weights for {random[:3]} ({len(random)} in all) outside the "
                         f"task head {heads}: transformers initialises them randomly at every load, so no reload "
                         f"would be the model that was trained. Add {modules} to modules_to_save (with the head) to "
                         "train and save them with the adapter, or load a checkpoint that holds them.")
    return model


def _parents(key: str) -> list[str]:
    """The module names a parameter name lies in: ``"a.b.weight"`` -> ``["a", "a.b"]``."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)
