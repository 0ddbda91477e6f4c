"""The transformers hook: saved DoRA magnitudes on ``load_adapter`` of an hf_lorax adapter folder.

It acts only when the folder holds ``hf_lorax.json`` (or the state dict given belongs to such a folder's
adapter): a plain peft adapter loads exactly as transformers loads it, with transformers' own result.
"""

from __future__ import annotations

import torch

from .guard import InternalAPI, install_hook, wrap

TRANSFORMERS_RANGE = ("5.0.0", "5.24.0")

LOAD_ADAPTER = InternalAPI(
    path="transformers.integrations.peft:PeftAdapterMixin.load_adapter",
    params=("self", "peft_model_id", "adapter_name"), library="transformers", verified=TRANSFORMERS_RANGE,
    reason="transformers 5.x keeps freshly initialised DoRA magnitudes instead of the saved ones",
)
TRANSFORMERS_INTERNALS = [LOAD_ADAPTER]


def install() -> None:
    from transformers.integrations.peft import PeftAdapterMixin

    install_hook(LOAD_ADAPTER, lambda: wrap(PeftAdapterMixin, "load_adapter", _load_adapter_wrapper),
                 "hf_lorax DoRA adapters loaded with model.load_adapter may keep fresh magnitudes; load them with "
                 "hf_lorax.get_model or PeftModel.from_pretrained.")


def _load_adapter_wrapper(original):
    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        info = original(self, peft_model_id, adapter_name, *args, **kwargs)
        missing = [k for k in getattr(info, "missing_keys", ()) or () if "lora_magnitude_vector" in k]
        if missing and _is_hf_lorax_folder(peft_model_id):
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


def _is_hf_lorax_folder(path) -> bool:
    """A local adapter folder hf_lorax saved (its ``hf_lorax.json`` beside ``adapter_config.json``)."""
    import os

    from ..config import SIDECAR_NAME

    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, SIDECAR_NAME))
