"""The two places where hf_lorax hooks into peft; installed once by ``import hf_lorax``.

========================================  ===========================================================
hook                                      what it does
========================================  ===========================================================
``LoraModel._prepare_model``              For hf_lorax configs only: before peft injects layers,
                                          validate targets, resolve ``rank_map`` / ``alpha_map`` /
                                          ``fused_slices`` to exact module names and add the task head
                                          to ``modules_to_save`` (:func:`hf_lorax.targets.prepare_injection`).
                                          Covers ``get_peft_model``, ``PeftModel.from_pretrained``,
                                          ``load_adapter``, transformers ``add_adapter`` / ``load_adapter``.
``PeftConfigMixin.from_pretrained``       When a local adapter directory holds ``hf_lorax.json``, return
                                          the hf_lorax config it describes instead of a plain
                                          ``LoraConfig``, so ``PeftModel.from_pretrained``,
                                          ``AutoPeftModelFor*``, transformers ``load_adapter`` and
                                          ``Trainer`` resume rebuild hf_lorax layers (fused slices
                                          included). Without the file, behaviour is peft's.
transformers ``load_adapter``             After transformers loads a DoRA adapter, copy the saved
                                          magnitude vectors in: transformers 5.x maps the saved key
                                          ``...lora_magnitude_vector`` to ``...lora_magnitude_vector.<name>``
                                          instead of ``....<name>.weight`` and silently keeps freshly
                                          initialised magnitudes (affects plain peft DoRA too).
transformers ``CallbackHandler.on_log``   Before reporters see a ``Trainer.log`` call, merge the metrics
                                          that hf_lorax callbacks hold (``hf_lorax_pending_logs()``), so
                                          rank utilization reaches every reporter and ``log_history``.
                                          Callbacks without that method are untouched.
``PeftModel.create_or_update_model_card`` For hf_lorax configs, write hf_lorax's model card
                                          (``model_cards/adapter_card.md``), so ``save_pretrained``,
                                          ``push_to_hub`` and ``Trainer(push_to_hub=True)`` publish the
                                          same card as :func:`hf_lorax.push_adapter`.
``PeftModel.save_pretrained``             For hf_lorax configs, save all-or-nothing
                                          (:mod:`hf_lorax.saving`): a process killed mid-save leaves the
                                          previous adapter intact.
========================================  ===========================================================

Everything else needs no hook: the configs are ``LoraConfig`` subclasses whose layers reach peft through
``LoraConfig._register_custom_module``, and saved adapters are standard peft LoRA.
"""

from __future__ import annotations

import os

from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraConfig, LoraModel

_INSTALLED = False


def install() -> None:
    """Install both hooks (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _wrap_prepare_model()
    _wrap_config_from_pretrained()
    _wrap_transformers_load_adapter()
    _wrap_callback_on_log()
    _wrap_model_card()
    _wrap_save_pretrained()
    _INSTALLED = True


def _wrap_prepare_model() -> None:
    original = LoraModel._prepare_model

    def _prepare_model(self, peft_config, model):
        from .config import LoRAConfig
        from .targets import prepare_injection

        if isinstance(peft_config, LoRAConfig):
            prepare_injection(peft_config, model, lambda key: self._check_target_module_exists(peft_config, key))
        return original(self, peft_config, model)

    _prepare_model.__wrapped__ = original
    LoraModel._prepare_model = _prepare_model


def _wrap_config_from_pretrained() -> None:
    original = PeftConfigMixin.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return upgrade_config(config, pretrained_model_name_or_path, subfolder)

    from_pretrained.__wrapped__ = original
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)


def upgrade_config(config, path, subfolder=None):
    """Turn a plain ``LoraConfig`` read from ``path`` into the hf_lorax config its sidecar describes."""
    from .config import from_peft_config, read_sidecar

    if type(config) is not LoraConfig or not isinstance(path, (str, os.PathLike)):
        return config
    directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        directory = _download_sidecar(os.fspath(path), subfolder)
        if directory is None:
            return config
    sidecar = read_sidecar(directory)
    return config if sidecar is None else from_peft_config(config, sidecar)


def _download_sidecar(repo_id: str, subfolder: str | None) -> str | None:
    """The local folder of a Hub adapter's ``hf_lorax.json``, or None (no file, offline, not a repo id)."""
    from huggingface_hub import hf_hub_download

    from .config import SIDECAR_NAME

    try:
        path = hf_hub_download(repo_id, SIDECAR_NAME, subfolder=subfolder)
    except Exception:  # no such file, no network, not a repo id: load as plain peft
        return None
    return os.path.dirname(path)


def _wrap_transformers_load_adapter() -> None:
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter

    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        info = original(self, peft_model_id, adapter_name, *args, **kwargs)
        missing = [k for k in getattr(info, "missing_keys", ()) or () if "lora_magnitude_vector" in k]
        if missing:
            restore_dora_magnitudes(self, peft_model_id, adapter_name or "default", kwargs.get("adapter_state_dict"))
            info.missing_keys = {k for k in info.missing_keys if "lora_magnitude_vector" not in k}
        return info

    load_adapter.__wrapped__ = original
    PeftAdapterMixin.load_adapter = load_adapter


def restore_dora_magnitudes(model, adapter_path, adapter_name: str, state_dict=None) -> int:
    """Copy saved DoRA magnitudes (``<module>.lora_magnitude_vector``) into ``model``; returns how many."""
    import torch

    if state_dict is None:
        from peft.utils import load_peft_weights

        state_dict = load_peft_weights(adapter_path)
    restored = 0
    with torch.no_grad():
        for key, value in state_dict.items():
            if not key.endswith(".lora_magnitude_vector"):
                continue
            module_name = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
            module = model.get_submodule(module_name)
            module.lora_magnitude_vector[adapter_name].weight.copy_(value)
            restored += 1
    return restored


def _wrap_callback_on_log() -> None:
    from transformers.trainer_callback import CallbackHandler

    original = CallbackHandler.on_log

    def on_log(self, args, state, control, logs):
        for callback in self.callbacks:
            pending = getattr(callback, "hf_lorax_pending_logs", None)
            extra = pending() if callable(pending) else None
            if extra:
                logs.update(extra)
                if state.log_history:  # Trainer.log appended this call's entry just before on_log
                    state.log_history[-1].update(extra)
        return original(self, args, state, control, logs)

    on_log.__wrapped__ = original
    CallbackHandler.on_log = on_log


def _wrap_model_card() -> None:
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card

    def create_or_update_model_card(self, output_dir: str):
        from .config import LoRAConfig
        from .hub import card_for_model, write_model_card

        if not any(isinstance(c, LoRAConfig) for c in self.peft_config.values()):
            return original(self, output_dir)
        target = getattr(self, "_hf_lorax_save_target", None) or output_dir  # not the temporary directory
        write_model_card(card_for_model(self, output_dir, repo_id=os.path.basename(os.path.abspath(target))), output_dir)

    create_or_update_model_card.__wrapped__ = original
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _wrap_save_pretrained() -> None:
    from peft import PeftModel

    original = PeftModel.save_pretrained

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        from .config import LoRAConfig
        from .saving import atomic_directory_write

        if not is_main_process or not any(isinstance(c, LoRAConfig) for c in self.peft_config.values()):
            return original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        self._hf_lorax_save_target = save_directory
        try:
            atomic_directory_write(save_directory, lambda tmp: original(self, tmp, *args, **kwargs))
        finally:
            self._hf_lorax_save_target = None

    save_pretrained.__wrapped__ = original
    PeftModel.save_pretrained = save_pretrained
