"""The two peft hooks: resolve hf_lorax configs before injection, and read ``hf_lorax.json`` on config load.

Both act only on hf_lorax configs / adapter folders that hold ``hf_lorax.json``; every other peft use is
untouched. :func:`install` is called by :func:`hf_lorax.integrations.hooks.install` and installs each hook
only when its version and signature check out (:mod:`hf_lorax.integrations.guard`).
"""

from __future__ import annotations

import logging
import os

from peft.config import PeftConfigMixin
from peft.tuners.lora import LoraConfig, LoraModel

from ..adapter_files import read_sidecar
from ..config import LoRAConfig
from ..model_prep import prepare_injection
from .guard import install_hook, wrap
from .peft_api import CONFIG_FROM_PRETRAINED, PREPARE_MODEL

logger = logging.getLogger(__name__)


def install() -> None:
    install_hook(PREPARE_MODEL, lambda: wrap(LoraModel, "_prepare_model", _prepare_model_wrapper),
                 "hf_lorax.get_model(config) and get_model(adapter_dir) work as usual, but peft.get_peft_model and "
                 "PeftModel.from_pretrained given an hf_lorax config now build peft's own layers: rank_map, alpha_map "
                 "and fused_slices are NOT applied there. Use hf_lorax.get_model.")
    install_hook(CONFIG_FROM_PRETRAINED,
                 lambda: wrap(PeftConfigMixin, "from_pretrained", _from_pretrained_wrapper, as_classmethod=True),
                 "Adapters load as plain peft LoRA (numerically the same; fused slices stay dense); "
                 "hf_lorax.get_model(path) still reads hf_lorax.json.")


def _prepare_model_wrapper(original):
    def _prepare_model(self, peft_config, model):
        if isinstance(peft_config, LoRAConfig):
            prepare_injection(peft_config, model)
        return original(self, peft_config, model)

    return _prepare_model


def _from_pretrained_wrapper(original):
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        config = original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return upgrade_config(config, pretrained_model_name_or_path, subfolder, **kwargs)

    return from_pretrained


def upgrade_config(config, path, subfolder=None, **hub_kwargs):
    """Turn a plain ``LoraConfig`` read from ``path`` into the hf_lorax config its ``hf_lorax.json`` describes."""
    if type(config) is not LoraConfig or not isinstance(path, (str, os.PathLike)):
        return config
    directory = os.path.join(path, subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(directory):
        directory = _hub_sidecar_folder(os.fspath(path), subfolder, **hub_kwargs)
        if directory is None:
            return config
    sidecar = read_sidecar(directory)
    return config if sidecar is None else LoRAConfig.from_peft_config(config, sidecar)


def _hub_sidecar_folder(repo_id: str, subfolder: str | None, revision: str | None = None, **_) -> str | None:
    """The local folder of a Hub adapter's ``hf_lorax.json``; None when the repo has none.

    Reached only for a Hub repo id, after peft fetched ``adapter_config.json`` from the same repo. A repo
    without the file is a plain peft adapter. Offline with the file not cached, the adapter loads as plain
    peft LoRA, which computes the same function (fused slices are saved as exact dense LoRA), with a warning.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from ..config import SIDECAR_NAME

    try:
        path = hf_hub_download(repo_id, SIDECAR_NAME, subfolder=subfolder, revision=revision)
    except LocalEntryNotFoundError as exc:  # offline (a subclass of EntryNotFoundError: test it first)
        logger.warning("Could not fetch %s of %s (%s); loading it as a plain peft LoRA adapter.", SIDECAR_NAME, repo_id, exc)
        return None
    except EntryNotFoundError:  # the repo has no hf_lorax.json: a plain peft adapter
        return None
    return os.path.dirname(path)
