"""Checks on saved adapter directories, so a broken file fails with its name instead of deep in torch."""

from __future__ import annotations

import json
import os

from peft import PeftConfig

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"


def check_adapter_dir(path: str, allow_pickle: bool = False) -> PeftConfig:
    """Validate ``adapter_config.json`` and the weights file of ``path``; return the adapter's config.

    A pickle ``adapter_model.bin`` (which can run code when unpickled) is refused unless ``allow_pickle``;
    peft then loads it with ``torch.load(weights_only=True)``.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"{config_path} is not a peft adapter config: it has no 'peft_type' key.")
    if raw["peft_type"] != "LORA":
        raise ValueError(f"{config_path} describes a {raw['peft_type']} adapter; hf_lorax loads LoRA/DoRA adapters.")
    try:
        config = PeftConfig.from_pretrained(path)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} holds invalid values: {exc}") from exc
    check_weights_file(path, allow_pickle)
    return config


def check_weights_file(path: str, allow_pickle: bool = False) -> None:
    weights = os.path.join(path, SAFETENSORS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLE_FILE)):
            if not allow_pickle:
                raise ValueError(
                    f"{path!r} holds only a pickle {PICKLE_FILE}, which can execute code when loaded. Convert it to "
                    f"safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)."
                )
            return
        raise FileNotFoundError(f"{path!r} has {CONFIG_FILE} but no {SAFETENSORS_FILE}.")
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as exc:  # safetensors raises its own SafetensorError for every kind of damage
        raise ValueError(f"{weights} is truncated or corrupt ({exc}); save the adapter again.") from exc
    size = os.path.getsize(weights)
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{weights} is truncated: {size} bytes on disk, {8 + header_len + end} expected.")
