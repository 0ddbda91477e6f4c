"""``get_model``: a base model with hf_lorax adapters, ready for a ``Trainer`` loop.

The route from a config to layers, all visible here: :func:`prepare` checks and prepares the base model once,
with :func:`hf_lorax.plan.resolve` validating the config against the model into an
:class:`~hf_lorax.plan.AdapterPlan`; peft receives a resolved *copy* of the config
(:meth:`~hf_lorax.config.LoRAConfig.with_plan`) with hf_lorax's layers registered on it
(:func:`hf_lorax.layers.layer_mapping`); each layer takes its rank, alpha and slices from the plan. The user's
config object is not changed.

The returned model is peft's own task class (``PeftModelForCausalLM``, ...) with two methods of
:class:`HfLoraxPeftModel` on top: ``save_pretrained`` is all-or-nothing and writes hf_lorax's model card after
the adapter files, and ``create_or_update_model_card`` (what ``Trainer.create_model_card`` calls) renders that
same card.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from .adapter_files import atomic_directory_write, check_adapter_dir, read_sidecar
from .base_init import NO_DORA_CONVERSION, check_loadable
from .card import write_model_card
from .class_swap import register_mixin, swap_class
from .config import LoRAConfig, QLoRAConfig
from .integrations.peft_api import register_layers
from .integrations.sharding import gathered_adapter_state, is_sharded, zero3_enabled
from .integrations.transformers_api import is_trainer_checkpoint_dir
from .layers import layer_mapping
from .loss import declare_mean_loss, prepare_loss
from .plan import find_task_heads, resolve
from .quantization import prepare_for_kbit_training
from .task_types import AUTO_CLASSES, HEAD_TASK_TYPES, LABELLED_TASK_TYPES, task_name

logger = logging.getLogger(__name__)


def get_model(config: LoRAConfig | str | os.PathLike, model: nn.Module | None = None, *, is_trainable: bool = True,
              allow_pickle: bool = False, logits_free_loss: bool = True, adapter_kwargs: dict | None = None,
              **from_pretrained_kwargs: Any) -> PeftModel:
    """Build (or load) a ``PeftModel`` with hf_lorax adapters.

    Args:
        config: an hf_lorax config (:class:`LoRAConfig`, :class:`DoRAConfig`, :class:`QLoRAConfig`), or
            the directory of a saved adapter (hf_lorax or plain peft LoRA) to load.
        model: the base model. If omitted, ``config.base_model_name_or_path`` is loaded with the Auto class
            of ``config.task_type`` (``SEQ_CLS`` gets ``num_labels``).
        is_trainable: when loading a saved adapter, whether its weights train (default) or are frozen.
        allow_pickle: load an adapter saved only as a pickle ``adapter_model.bin`` (refused by default, as
            unpickling can run code; loaded with ``torch.load(weights_only=True)``).
        logits_free_loss: for causal LMs whose loss is a plain shifted cross-entropy, training forwards with
            ``labels`` compute the loss from the hidden states in row chunks and never form the logits
            (:mod:`hf_lorax.loss`; ``outputs.logits`` is then ``None`` in training). ``False`` keeps the model's own
            forward.
        adapter_kwargs: for an adapter on the Hub, the download options of the adapter repo (``token``,
            ``revision``, ``cache_dir``, ``subfolder``, ``force_download``, ...), as transformers' ``adapter_kwargs``;
            ``token`` and ``cache_dir`` default to those in ``from_pretrained_kwargs``.
        **from_pretrained_kwargs: passed to the Auto class's ``from_pretrained`` (``torch_dtype``, ...).

    The task head (RoBERTa's ``classifier``, GPT-2's ``score``, ...) is trained and saved with the adapter;
    everything else is frozen.

    Example::

        from hf_lorax import DoRAConfig, get_model
        model = get_model(DoRAConfig(base_model_name_or_path="roberta-base", task_type="SEQ_CLS",
                                     num_labels=2, target_modules=["query", "value"]))
        model.save_pretrained("out/adapter")
        again = get_model("out/adapter")
    """
    if isinstance(config, (str, os.PathLike)):
        return _load_adapter(os.fspath(config), model, is_trainable, allow_pickle, logits_free_loss,
                             from_pretrained_kwargs, adapter_kwargs)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"get_model takes an hf_lorax config (LoRAConfig, DoRAConfig, QLoRAConfig) or an adapter "
                        f"directory, got {type(config).__name__}.")
    # DeepSpeed ZeRO-3 partitions floating-point tensors only: packed 4-bit storage is refused before anything
    # loads (else DeepSpeed fails mid-setup with an ``AttributeError`` about ``ds_id``)
    packed = getattr(config, "quant_storage", None) == "uint8" and not getattr(config, "load_in_8bit", False)
    if packed and zero3_enabled():
        raise ValueError(f"QLoRAConfig(quant_storage={config.quant_storage!r}) under DeepSpeed ZeRO-3: ZeRO-3 "
                         f"partitions floating-point tensors only. Set quant_storage to the compute dtype "
                         f"({config.compute_dtype!r}; the scripts' --quant_storage).")
    base = model if model is not None else load_base_model(config, **from_pretrained_kwargs)
    peft_model = get_peft_model(base, prepare(config, base, logits_free_loss))
    return swap_class(peft_model, HfLoraxPeftModel)


def prepare(config: LoRAConfig, model: nn.Module, logits_free_loss: bool = True) -> LoRAConfig:
    """Check ``config`` against ``model``, change ``model`` as training needs, return the resolved config peft injects.

    First every check that can reject the config for this model (the head's label count, then the plan: targets,
    maps, slices, heads, a quantized base for QLoRA), so nothing is changed before a typo is reported; then every
    change (a pad token for GPT-2-style classification heads, k-bit preparation, the Trainer's loss normalisation and
    the causal-LM loss); last, hf_lorax's layers are registered on the resolved copy peft receives. The user's config
    is never changed. Runs once per model.
    """
    task, model_config = task_name(config.task_type), getattr(model, "config", None)
    labels = getattr(model_config, "num_labels", None)
    if config.num_labels and task in LABELLED_TASK_TYPES and labels not in (None, config.num_labels):
        raise ValueError(f"config.num_labels={config.num_labels} but the model's head has {labels} labels. "
                         "Load the model with the same num_labels, or let get_model load it.")
    plan = config.resolved_plan or resolve(config, model)
    eos = getattr(model_config, "eos_token_id", None)
    if task == "SEQ_CLS" and eos is not None and getattr(model_config, "pad_token_id", None) is None:
        # GPT-2-style heads need a pad id to find the last token of each row
        model_config.pad_token_id = eos if isinstance(eos, int) else eos[0]
        logger.info("pad_token_id was unset; using eos_token_id=%s for the classification head.", eos)
    if isinstance(config, QLoRAConfig):
        prepare_for_kbit_training(model)
    resolved = config if config.resolved_plan is not None else config.with_plan(plan)
    prepare_loss(model, task, bool(plan.modules_to_save), logits_free_loss)
    register_layers(resolved, layer_mapping())
    return resolved


def injection_config(config: LoRAConfig, model: nn.Module) -> LoRAConfig:
    """The config peft should inject into ``model`` (the peft hook's one call): ``config`` itself when it carries a
    plan already (:func:`prepare` made it), else its resolved copy; hf_lorax's layers registered on it. The model is
    the user's: only what injecting needs is changed."""
    resolved = config if config.resolved_plan is not None else config.with_plan(resolve(config, model))
    if resolved.resolved_plan.modules_to_save:
        declare_mean_loss(model)
    register_layers(resolved, layer_mapping())
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


def _load_adapter(path: str, model: nn.Module | None, is_trainable: bool, allow_pickle: bool, logits_free_loss: bool,
                  kwargs: dict, adapter_kwargs: dict | None = None) -> PeftModel:
    hub = {**{k: kwargs[k] for k in ("token", "cache_dir") if kwargs.get(k) is not None}, **(adapter_kwargs or {})}
    if os.path.isdir(path):
        hub = {}  # a local folder: nothing to download
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{path!r} has no adapter_config.json; it is not a saved adapter directory.")
        config = check_adapter_dir(path, allow_pickle)
        sidecar = read_sidecar(path)  # a malformed sidecar fails here with its own message
        check_loadable(config.init_lora_weights, path, bool(config.use_dora))  # the base it was trained on must be rebuildable
    elif _looks_like_path(path) or path.count("/") != 1:
        raise FileNotFoundError(f"Adapter directory {path!r} does not exist (and it is not a Hub repo id).")
    else:  # a Hub repo id: peft downloads the adapter, hf_lorax its hf_lorax.json, both with the user's options
        from .hub import fetch_sidecar

        config = PeftConfig.from_pretrained(path, **hub)
        sidecar = fetch_sidecar(path, **hub)
    if sidecar is not None and type(config) is LoraConfig:  # a Hub adapter, or a local one with the peft hook off
        config = LoRAConfig.from_peft_config(config, sidecar)
    base = model if model is not None else load_base_model(config, **kwargs)
    if isinstance(config, LoRAConfig):
        config = prepare(config, base, logits_free_loss)
    try:
        loaded = PeftModel.from_pretrained(base, path, config=config, is_trainable=is_trainable, **hub)
    except RuntimeError as exc:
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        head = "lora_" not in mismatches[0]  # a task head saved with another label count (a plain peft adapter)
        raise ValueError(f"The adapter in {path!r} does not fit this base model: {mismatches[0].rstrip('.')}." + (
            " It is the task head: load the base with its label count, get_model(path, num_labels=N), or pass "
            "model=... with that head." if head else "")) from exc
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        _check_every_weight_loaded(loaded, path)
    return swap_class(loaded, HfLoraxPeftModel)


def _check_every_weight_loaded(model: PeftModel, path: str) -> None:
    """peft only warns when saved adapter weights have no place in the model (then they keep their initial
    values, and the adapter silently does nothing); here that is an error naming a key."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as weights:
        unplaced = sorted(set(weights.keys()) - set(get_peft_model_state_dict(model)))
    if unplaced:
        raise ValueError(f"The adapter in {path!r} holds weights this {type(model.get_base_model()).__name__} has "
                         f"no place for, e.g. {unplaced[0]!r} ({len(unplaced)} in all): the base model class or "
                         "architecture differs from the one it was trained on (check task_type and "
                         "base_model_name_or_path).")


# -- saving ---------------------------------------------------------------------------------------------


class HfLoraxPeftModel:
    """``save_pretrained`` / ``create_or_update_model_card`` for the models :func:`get_model` returns."""

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
        """peft's ``save_pretrained``, all-or-nothing (:func:`~hf_lorax.adapter_files.atomic_directory_write`),
        with hf_lorax's model card rendered from the saved files.

        Under DeepSpeed ZeRO-3 or FSDP2 the adapter's parameters are sharded: unless a ``state_dict`` is given,
        they are gathered first, a collective, so every process must call this (as transformers' own
        ``save_pretrained``), with ``is_main_process`` true on the one that writes.

        peft's ``path_initial_model_for_weight_conversion`` (a PiSSA / OLoRA / CorDA / LoRA-GA adapter as a LoRA of
        the original base) is refused for DoRA adapters, which it would convert wrong without a warning.
        """
        parent = super()
        if kwargs.get("path_initial_model_for_weight_conversion") and any(c.use_dora for c in self.peft_config.values()):
            raise ValueError(f"save_pretrained(path_initial_model_for_weight_conversion=...) of a DoRA adapter: "
                             f"{NO_DORA_CONVERSION}. Nothing was written; save without it.")
        if kwargs.get("state_dict") is None and is_sharded(self):
            kwargs["state_dict"] = gathered_adapter_state(self)
        if not is_main_process:
            return parent.save_pretrained(save_directory, *args, is_main_process=False, **kwargs)
        name = os.path.basename(os.path.abspath(save_directory))
        # a Trainer's periodic checkpoint keeps peft's short card: rendering hf_lorax's re-reads the folder and
        # checks four serving engines, at every save_steps; Trainer.save_model() and push_adapter render it
        card_adapters = ([] if is_trainer_checkpoint_dir(save_directory)
                         else kwargs.get("selected_adapters") or list(self.peft_config))

        def write(tmp: str) -> None:
            parent.save_pretrained(tmp, *args, **kwargs)
            for adapter in card_adapters:  # peft puts adapters other than "default" in subfolders
                folder = tmp if adapter == "default" else os.path.join(tmp, adapter)
                if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
                    write_model_card(folder, repo_id=name)

        atomic_directory_write(os.fspath(save_directory), write)

    def create_or_update_model_card(self, output_dir: str) -> None:
        if os.path.isfile(os.path.join(output_dir, "adapter_model.safetensors")):
            write_model_card(output_dir)
        else:  # nothing saved there yet: peft's card
            super().create_or_update_model_card(output_dir)


register_mixin("HfLorax", HfLoraxPeftModel, "peft")
