"""hf_lorax: LoRA, DoRA and QLoRA for peft and transformers, with per-layer rank maps.

Quick start::

    from transformers import Trainer, TrainingArguments
    from hf_lorax import DoRAConfig, get_model, describe

    config = DoRAConfig(
        base_model_name_or_path="roberta-base", task_type="SEQ_CLS", num_labels=2,
        r=8, lora_alpha=16, target_modules=["query", "value"],
        rank_map={"layer.{0-5}.attention.self.query": 16, "layer.{6-11}.*": 4},
    )
    model = get_model(config)            # a peft PeftModel; the classifier head trains too
    print(describe(model))               # module / r / alpha / scaling / params
    Trainer(model=model, args=TrainingArguments("out"), train_dataset=ds).train()
    model.save_pretrained("out/adapter") # a standard peft LoRA adapter (safetensors)

For causal LMs trained with the ``Trainer``'s label smoothing, ``TargetedLossTrainer`` is a drop-in ``Trainer``
that computes the same loss without forming the logits::

    from hf_lorax import TargetedLossTrainer
    TargetedLossTrainer(model=model, args=TrainingArguments("out", label_smoothing_factor=0.1),
                        train_dataset=ds, data_collator=collator).train()

The configs are ``peft.LoraConfig`` subclasses: ``peft.get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelFor*``, transformers ``add_adapter`` / ``load_adapter`` and ``Trainer`` all take them.
Importing hf_lorax installs the version-guarded hooks listed in :mod:`hf_lorax.integrations`; they act only on
hf_lorax configs and adapter folders, so code that does not use hf_lorax runs as without it.
"""

from . import _command_startup  # noqa: F401  (first: an hf_lorax command imports quietly)
from ._version import __version__
from .adapter_files import read_adapter_folder
from .analysis import RankUtilizationCallback
from .base_model import load_base_model
from .card import write_model_card
from .config import DoRAConfig, LoRAConfig, QLoRAConfig
from .describe import AdapterReport, describe
from .export import export_adapter
from .hooks import install as _install_hooks
from .hotswap import hotswap_adapter
from .hub import push_adapter
from .model import get_model
from .optim import create_loraplus_optimizer, loraplus_param_groups
from .plan import AdapterPlan, resolve
from .quantization import merge_and_unload
from .serving import check_serving

_install_hooks()

__all__ = ["AdapterPlan", "AdapterReport", "DoRAConfig", "LoRAConfig", "QLoRAConfig", "RankUtilizationCallback",
           "TargetedLossTrainer", "__version__", "check_serving", "create_loraplus_optimizer", "describe",
           "export_adapter", "get_model", "hotswap_adapter", "load_base_model", "loraplus_param_groups",
           "merge_and_unload", "push_adapter", "read_adapter_folder", "resolve", "write_model_card"]


def __getattr__(name: str):
    if name == "TargetedLossTrainer":  # importing transformers.Trainer takes seconds; load it on first use
        from .loss import TargetedLossTrainer

        return TargetedLossTrainer
    raise AttributeError(f"module 'hf_lorax' has no attribute {name!r}")
