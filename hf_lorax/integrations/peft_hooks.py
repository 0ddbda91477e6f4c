"""The two peft hooks: hand peft a resolved copy of an hf_lorax config before injection, and read ``hf_lorax.json``
beside a local ``adapter_config.json``.

Both act only on hf_lorax configs / local adapter folders that hold ``hf_lorax.json``: for every other config
or folder the wrapped method runs exactly as peft wrote it, with the same arguments and result. Neither makes a
network request (a Hub adapter's ``hf_lorax.json`` is fetched by :func:`hf_lorax.get_model` only, see
:func:`hf_lorax.hub.fetch_sidecar`). :func:`install` is called by :func:`hf_lorax.integrations.hooks.install` and
installs each hook only when its version and signature check out (:mod:`hf_lorax.integrations.guard`).
"""

from __future__ import annotations

import os

from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraConfig, LoraModel

from ..adapter_files import read_sidecar
from ..config import LoRAConfig
from ..model_prep import prepare_injection
from .guard import install_hook, wrap
from .peft_api import CONFIG_FROM_PRETRAINED, INJECT_ADAPTER


def install() -> None:
    install_hook(INJECT_ADAPTER, lambda: wrap(LoraModel, "inject_adapter", _inject_adapter_wrapper),
                 "hf_lorax.get_model(config) and get_model(adapter_dir) work as usual, but peft.get_peft_model and "
                 "PeftModel.from_pretrained given an hf_lorax config now build peft's own layers: rank_map, alpha_map "
                 "and fused_slices are NOT applied there. Use hf_lorax.get_model.")
    install_hook(CONFIG_FROM_PRETRAINED,
                 lambda: wrap(PeftConfigMixin, "from_pretrained", _from_pretrained_wrapper, as_classmethod=True),
                 "Adapters load as plain peft LoRA (numerically the same; fused slices train as dense LoRA); "
                 "hf_lorax.get_model(path) still reads hf_lorax.json.")


def _inject_adapter_wrapper(original):
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config.get(adapter_name)
        if isinstance(config, LoRAConfig):
            # peft reads self.peft_config[adapter_name] first thing: it gets the resolved copy, the user's object
            # stays as it was (and can be given to another model)
            self.peft_config[adapter_name] = prepare_injection(config, model)
        return original(self, model, adapter_name, *args, **kwargs)

    return inject_adapter


def _from_pretrained_wrapper(original):
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return upgrade_config(config, pretrained_model_name_or_path, subfolder)

    return from_pretrained


def upgrade_config(config, path, subfolder=None):
    """The resolved hf_lorax config of a local folder whose ``hf_lorax.json`` describes ``config``; else ``config``.

    Only a plain ``LoraConfig`` read from a local directory is looked at (a file-existence check, no request).
    """
    if type(config) is not LoraConfig or not isinstance(path, (str, os.PathLike)):
        return config
    directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        return config
    sidecar = read_sidecar(directory)
    return config if sidecar is None else LoRAConfig.from_peft_config(config, sidecar)
