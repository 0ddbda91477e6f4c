"""``get_model``: a base model with hf_lorax adapters, ready for a ``Trainer`` loop."""

from __future__ import annotations

import logging
import os
from typing import Any

from peft import PeftConfig, PeftModel, get_peft_model
from torch import nn

from .config import LoRAConfig, read_sidecar

logger = logging.getLogger(__name__)

# Auto class for each peft task type (None: the bare model).
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
    None: "AutoModel",
}
_LABELLED_TASKS = ("SEQ_CLS", "TOKEN_CLS")


def get_model(
    config: LoRAConfig | str | os.PathLike,
    model: nn.Module | None = None,
    *,
    is_trainable: bool = True,
    allow_pickle: bool = False,
    **from_pretrained_kwargs: Any,
) -> PeftModel:
    """Build (or load) a ``PeftModel`` with hf_lorax adapters.

    Args:
        config: an hf_lorax config (:class:`LoRAConfig`, :class:`DoRAConfig`, :class:`QLoRAConfig`), or
            the directory of a saved adapter (hf_lorax or plain peft LoRA) to load.
        model: the base model. If omitted, ``config.base_model_name_or_path`` is loaded with the Auto class
            of ``config.task_type`` (``SEQ_CLS`` gets ``num_labels``).
        is_trainable: when loading a saved adapter, whether its weights train (default) or are frozen.
        allow_pickle: load an adapter saved only as a pickle ``adapter_model.bin`` (refused by default, as
            unpickling can run code; loaded with ``torch.load(weights_only=True)``).
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
        return _load_adapter(os.fspath(config), model, is_trainable, allow_pickle, from_pretrained_kwargs)
    if not isinstance(config, LoRAConfig):
        raise TypeError(
            f"get_model takes an hf_lorax config (LoRAConfig, DoRAConfig, QLoRAConfig) or an adapter directory, "
            f"got {type(config).__name__}."
        )
    base = model if model is not None else load_base_model(config, **from_pretrained_kwargs)
    _check_base_model(config, base)
    base = config.prepare_base_model(base)
    return get_peft_model(base, config)


def load_base_model(config: PeftConfig, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load ``config.base_model_name_or_path`` with the Auto class matching ``config.task_type``."""
    import transformers

    name = config.base_model_name_or_path
    if not name:
        raise ValueError("config.base_model_name_or_path is empty: set it, or pass model=... to get_model.")
    if _looks_like_path(name) and not os.path.isdir(name):
        raise FileNotFoundError(f"Base model directory {name!r} does not exist.")
    task = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = dict(from_pretrained_kwargs)
    if task in _LABELLED_TASKS and getattr(config, "num_labels", None):
        kwargs.setdefault("num_labels", config.num_labels)
        # a checkpoint whose head has another label count: the head is re-initialised and trained anyway
        kwargs.setdefault("ignore_mismatched_sizes", True)
    if hasattr(config, "base_model_kwargs"):
        kwargs = {**config.base_model_kwargs(), **kwargs}
    try:
        return auto.from_pretrained(name, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " HF_HUB_OFFLINE=1 is set, so only local directories and the local cache are used." if offline else ""
        raise OSError(f"Could not load base model {name!r} with {auto.__name__}: {exc}.{hint}") from exc


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or os.path.exists(name)


def _check_base_model(config: LoRAConfig, base: nn.Module) -> None:
    model_config = getattr(base, "config", None)
    if model_config is None:
        return
    task = config.task_type
    if config.num_labels and task in _LABELLED_TASKS and model_config.num_labels != config.num_labels:
        raise ValueError(
            f"config.num_labels={config.num_labels} but the model's head has {model_config.num_labels} labels. "
            "Load the model with the same num_labels, or let get_model load it."
        )
    if task == "SEQ_CLS" and getattr(model_config, "pad_token_id", None) is None:
        eos = getattr(model_config, "eos_token_id", None)
        if eos is not None:  # GPT-2-style heads need a pad id to find the last token of each row
            model_config.pad_token_id = eos if isinstance(eos, int) else eos[0]
            logger.info("pad_token_id was unset; using eos_token_id=%s for the classification head.", eos)


def _load_adapter(path: str, model: nn.Module | None, is_trainable: bool, allow_pickle: bool, kwargs: dict) -> PeftModel:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{path!r} has no adapter_config.json; it is not a saved adapter directory.")
        from .checks import check_adapter_dir

        config = check_adapter_dir(path, allow_pickle)
        read_sidecar(path)  # a malformed sidecar fails here with its own message
    elif _looks_like_path(path) or path.count("/") != 1:
        raise FileNotFoundError(f"Adapter directory {path!r} does not exist (and it is not a Hub repo id).")
    else:  # a Hub repo id: peft downloads it (the hooks read its hf_lorax.json too)
        config = PeftConfig.from_pretrained(path)
    base = model if model is not None else load_base_model(config, **kwargs)
    if isinstance(config, LoRAConfig):
        base = config.prepare_base_model(base)
    try:
        return PeftModel.from_pretrained(base, path, config=config, is_trainable=is_trainable)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ValueError(f"The adapter in {path!r} does not fit this base model: {_first_mismatch(exc)}") from exc


def _first_mismatch(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    return lines[0] if lines else str(exc)
