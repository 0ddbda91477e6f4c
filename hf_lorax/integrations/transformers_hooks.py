"""The two transformers hooks: DoRA magnitudes on ``load_adapter``, and callback metrics on ``Trainer.log``."""

from __future__ import annotations

import torch

from .guard import InternalAPI, install_hook, wrap

TRANSFORMERS_RANGE = ("5.0.0", "5.24.0")

LOAD_ADAPTER = InternalAPI(
    path="transformers.integrations.peft:PeftAdapterMixin.load_adapter",
    params=("self", "peft_model_id", "adapter_name"), library="transformers", verified=TRANSFORMERS_RANGE,
    reason="transformers 5.x keeps freshly initialised DoRA magnitudes instead of the saved ones",
)
CALLBACK_ON_LOG = InternalAPI(
    path="transformers.trainer_callback:CallbackHandler.on_log",
    params=("self", "args", "state", "control", "logs"), library="transformers", verified=TRANSFORMERS_RANGE,
    reason="merge hf_lorax callbacks' metrics into a Trainer.log call before the reporters see it",
)
TRANSFORMERS_INTERNALS = [LOAD_ADAPTER, CALLBACK_ON_LOG]


def install() -> None:
    from transformers.integrations.peft import PeftAdapterMixin
    from transformers.trainer_callback import CallbackHandler

    install_hook(LOAD_ADAPTER, lambda: wrap(PeftAdapterMixin, "load_adapter", _load_adapter_wrapper),
                 "DoRA adapters loaded with model.load_adapter may keep fresh magnitudes; load them with "
                 "hf_lorax.get_model or PeftModel.from_pretrained.")
    install_hook(CALLBACK_ON_LOG, lambda: wrap(CallbackHandler, "on_log", _on_log_wrapper),
                 "RankUtilizationCallback's metrics reach trainer.state.log_history and the callbacks after it, "
                 "not reporters such as TensorBoard.")


def _load_adapter_wrapper(original):
    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        info = original(self, peft_model_id, adapter_name, *args, **kwargs)
        missing = [k for k in getattr(info, "missing_keys", ()) or () if "lora_magnitude_vector" in k]
        if missing:
            restore_dora_magnitudes(self, peft_model_id, adapter_name or "default", kwargs.get("adapter_state_dict"))
            info.missing_keys = {k for k in info.missing_keys if "lora_magnitude_vector" not in k}
        return info

    return load_adapter


def restore_dora_magnitudes(model, adapter_path, adapter_name: str, state_dict=None) -> int:
    """Copy saved DoRA magnitudes (``<module>.lora_magnitude_vector``) into ``model``; returns how many."""
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


def _on_log_wrapper(original):
    def on_log(self, args, state, control, logs):
        merge_pending_logs(self.callbacks, state, logs)
        return original(self, args, state, control, logs)

    return on_log


def merge_pending_logs(callbacks, state, logs: dict) -> None:
    """Add the metrics hf_lorax callbacks hold (``pending_logs()``) to ``logs`` and the last history entry."""
    for callback in callbacks:
        pending = getattr(callback, "hf_lorax_pending_logs", None)
        extra = pending() if callable(pending) else None
        if extra:
            logs.update(extra)
            if state.log_history:  # Trainer.log appended this call's entry just before on_log
                state.log_history[-1].update(extra)
