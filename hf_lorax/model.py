"""``get_model``: a base model with hf_lorax adapters, ready for a ``Trainer`` loop.

One route for a new config and a saved adapter: the saved adapter's config is read
(:func:`~hf_lorax.adapter_files.read_adapter_config`, a local folder or a Hub repo), the base model loaded
(:func:`~hf_lorax.base_model.load_base_model`) and prepared once (:func:`~hf_lorax.base_model.prepare`: the config
checked against the model into an :class:`~hf_lorax.plan.AdapterPlan`, then every change to the base); peft
receives the resolved *copy* of the config with hf_lorax's layers registered on it, and each layer takes its rank,
alpha and slices from the plan. The user's config object is not changed.

The returned model is peft's own task class (``PeftModelForCausalLM``, ...) with two methods of
:class:`HfLoraxPeftModel` on top: ``save_pretrained`` is all-or-nothing and writes hf_lorax's model card after
the adapter files, and ``create_or_update_model_card`` (what ``Trainer.create_model_card`` calls) renders that
same card.
"""

from __future__ import annotations

import os
from typing import Any

from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

from .adapter_files import SAFETENSORS_FILE, atomic_directory_write, read_adapter_config
from .base_init import NO_DORA_CONVERSION
from .base_model import load_base_model, prepare
from .card import write_model_card
from .class_swap import register_mixin, swap_class
from .config import LoRAConfig
from .integrations.sharding import gathered_adapter_state, is_sharded, zero3_enabled
from .integrations.transformers_api import is_trainer_checkpoint_dir


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
    path, hub = None, {}  # a saved adapter's folder or Hub repo; a Hub adapter's download options
    if isinstance(config, (str, os.PathLike)):
        path = config
        if not os.path.isdir(path):
            hub = {**{k: from_pretrained_kwargs[k] for k in ("token", "cache_dir")
                      if from_pretrained_kwargs.get(k) is not None}, **(adapter_kwargs or {})}
        config = read_adapter_config(path, allow_pickle, **hub)
    elif not isinstance(config, LoRAConfig):
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
    if isinstance(config, LoRAConfig):  # (a plain peft adapter loads as peft loads it)
        config = prepare(config, base, logits_free_loss)
    if path is None:
        return swap_class(get_peft_model(base, config), HfLoraxPeftModel)
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
    weights = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(weights):  # peft only warns about saved weights with no place (they would do nothing)
        with safe_open(weights, framework="pt") as saved:
            unplaced = sorted(set(saved.keys()) - set(get_peft_model_state_dict(loaded)))
        if unplaced:
            raise ValueError(f"The adapter in {path!r} holds weights this {type(base).__name__} has no place for, "
                             f"e.g. {unplaced[0]!r} ({len(unplaced)} in all): the base model class or architecture "
                             "differs from the one it was trained on (check task_type and base_model_name_or_path).")
    return swap_class(loaded, HfLoraxPeftModel)


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
