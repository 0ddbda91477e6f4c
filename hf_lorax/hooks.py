"""The hooks hf_lorax installs into peft and transformers (by ``import hf_lorax``), each version-guarded.

They live at the top of the package and call down into it; :mod:`hf_lorax.integrations` below them declares the
internals they wrap (:class:`~hf_lorax.integrations.guard.InternalAPI`). Each hook acts only on hf_lorax configs or
local adapter folders that hold ``hf_lorax.json``: for anything else the wrapped method runs exactly as its library
wrote it, with the same arguments and result (``tests/test_isolation.py``). None makes a network request (a Hub
adapter's ``hf_lorax.json`` is fetched by :func:`hf_lorax.get_model` only, :func:`hf_lorax.adapter_files.fetch_sidecar`).

=================================================  =====================================================
hook                                               why
=================================================  =====================================================
peft ``LoraModel.inject_adapter``                  ``peft.get_peft_model``, ``add_adapter``,
                                                   ``PeftModel.from_pretrained``, transformers
                                                   ``add_adapter`` / ``load_adapter``, TRL: hand peft the
                                                   resolved copy of an hf_lorax config (peft reads
                                                   ``self.peft_config[name]`` first thing and has no public
                                                   pre-injection hook); the user's object is untouched.
                                                   The model gets what training it needs
                                                   (:func:`~hf_lorax.base_model.injection_config`).
                                                   That ``LoraModel`` becomes a
                                                   :class:`~hf_lorax.quantization.DenseMergeLoraModel`:
                                                   a merge on a quantized base is dense throughout
peft ``PeftConfigMixin.from_pretrained``           a local folder with ``hf_lorax.json`` loads as its
                                                   resolved hf_lorax config
transformers ``PeftAdapterMixin.load_adapter``     transformers 5.x drops saved DoRA magnitudes: copy them
                                                   in, for hf_lorax folders only
peft ``hotswap_adapter_from_state_dict``           peft's ``hotswap_adapter`` gives every module of a rank-
                                                   or alpha-mapped adapter ``lora_alpha / r``: set each
                                                   module's own scaling, for hf_lorax adapters only (not
                                                   reached: that function bound by name before
                                                   ``import hf_lorax`` and called directly)
=================================================  =====================================================
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, load_peft_weights

from .adapter_files import read_sidecar
from .base_model import injection_config
from .class_swap import swap_class
from .config import SIDECAR_NAME, LoRAConfig
from .hotswap import check_hotswappable, set_module_scalings
from .integrations.guard import install_hook, installed_hooks
from .integrations.peft_api import CONFIG_FROM_PRETRAINED, HOTSWAP_FROM_STATE_DICT, INJECT_ADAPTER
from .integrations.transformers_api import LOAD_ADAPTER
from .quantization import DenseMergeLoraModel


def install() -> dict[str, bool]:
    """Install every hook whose library version and signature check out (idempotent); ``{hook: installed}``."""
    if not installed_hooks():  # each hook is considered once: wrapping twice would run it twice
        install_hook(INJECT_ADAPTER, _inject_adapter_wrapper,
                     "hf_lorax.get_model(config) and get_model(adapter_dir) work as usual, but peft.get_peft_model "
                     "and PeftModel.from_pretrained given an hf_lorax config now build peft's own layers: rank_map, "
                     "alpha_map and fused_slices are NOT applied there. Use hf_lorax.get_model.")
        install_hook(CONFIG_FROM_PRETRAINED, _from_pretrained_wrapper,
                     "Adapters load as plain peft LoRA (numerically the same; fused slices train as dense LoRA); "
                     "hf_lorax.get_model(path) still reads hf_lorax.json.")
        install_hook(LOAD_ADAPTER, _load_adapter_wrapper,
                     "hf_lorax DoRA adapters loaded with model.load_adapter may keep fresh magnitudes; load them "
                     "with hf_lorax.get_model or PeftModel.from_pretrained.")
        install_hook(HOTSWAP_FROM_STATE_DICT, _hotswap_wrapper,
                     "peft.utils.hotswap.hotswap_adapter gives every module of an hf_lorax adapter lora_alpha / r "
                     "(wrong with rank or alpha maps): use hf_lorax.hotswap_adapter, same arguments.")
    return installed_hooks()


def _inject_adapter_wrapper(original):
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config.get(adapter_name)
        if isinstance(config, LoRAConfig):
            # peft reads self.peft_config[adapter_name] first thing: it gets the resolved copy, the user's object
            # stays as it was (and can be given to another model)
            self.peft_config[adapter_name] = injection_config(config, model)
            swap_class(self, DenseMergeLoraModel)
        return original(self, model, adapter_name, *args, **kwargs)

    return inject_adapter


def _from_pretrained_wrapper(original):
    """The resolved hf_lorax config of a local folder whose ``hf_lorax.json`` describes the config peft read; else
    peft's config. Only a plain ``LoraConfig`` read from a local path is looked at (a file-existence check, no
    request)."""
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = pretrained_model_name_or_path
        if type(config) is not LoraConfig or not isinstance(path, (str, os.PathLike)):
            return config
        sidecar = read_sidecar(os.path.join(path, subfolder) if subfolder else os.fspath(path))
        return config if sidecar is None else LoRAConfig.from_peft_config(config, sidecar)

    return from_pretrained


def _load_adapter_wrapper(original):
    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        info = original(self, peft_model_id, adapter_name, *args, **kwargs)
        missing = [k for k in getattr(info, "missing_keys", ()) or () if "lora_magnitude_vector" in k]
        if (missing and isinstance(peft_model_id, (str, os.PathLike))
                and os.path.isfile(os.path.join(peft_model_id, SIDECAR_NAME))):
            # copy the saved DoRA magnitudes (``<module>.lora_magnitude_vector``) in
            state_dict, adapter = kwargs.get("adapter_state_dict"), adapter_name or "default"
            with torch.no_grad():
                for key, value in (load_peft_weights(peft_model_id) if state_dict is None else state_dict).items():
                    if key.endswith(".lora_magnitude_vector"):
                        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
                        self.get_submodule(module).lora_magnitude_vector[adapter].weight.copy_(value)
            info.missing_keys = {k for k in info.missing_keys if "lora_magnitude_vector" not in k}
        return info

    return load_adapter


def _hotswap_wrapper(original):
    """peft's hotswap sets each module's scaling from the top-level ``r`` / ``lora_alpha`` (it matches parameter names
    against module patterns); after it, an hf_lorax adapter's modules get their own (:func:`set_module_scalings`).
    peft's ``hotswap_adapter`` looks this function up in its module at every call, so the hook reaches it however it
    was imported; plain peft adapters swap exactly as peft wrote it."""
    def hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, *args, **kwargs):
        current = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        ours = isinstance(config, LoRAConfig) or isinstance(current, LoRAConfig)
        if ours:
            check_hotswappable(config)
        original(model, state_dict, adapter_name, config, *args, **kwargs)
        if ours:
            set_module_scalings(model, config, adapter_name)

    return hotswap_adapter_from_state_dict
