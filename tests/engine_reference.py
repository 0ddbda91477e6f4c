"""How serving engines turn a peft adapter folder into weights, written from their loaders (no engine installed).

Independent of hf_lorax on purpose: the export is checked against these, not against itself.

* vLLM (``vllm/lora/peft_helper.py`` ``PEFTHelper``, ``LoRALayerWeights.from_config``): keeps only its own
  fields of ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ``bias``, ``modules_to_save``,
  ``use_rslora``, ``use_dora``); raises for a config without ``r``, ``lora_alpha`` or ``target_modules``
  (required fields: no defaults), for ``modules_to_save`` and ``use_dora``; ``r`` above
  ``max_lora_rank`` is refused; every module is scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
* LoRAX / TGI (punica kernels): read ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
  ``fan_in_fan_out``; one scaling for every module; A/B of all layers stacked into one tensor, so every
  module must have the same rank; DoRA magnitudes and heads are not read.
"""

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

VLLM_KEYS = {"r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora"}
LORAX_KEYS = {"r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out"}


class EngineRefused(ValueError):
    pass


def served_deltas(folder, engine: str, max_lora_rank: int = 512) -> dict[str, torch.Tensor]:
    """``{module name: ΔW (out, in)}`` as ``engine`` computes it from ``folder``."""
    folder = Path(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    config = {k: v for k, v in raw.items() if k in (VLLM_KEYS if engine == "vllm" else LORAX_KEYS)}
    if engine != "vllm":  # read through peft's LoraConfig: its defaults for what the file leaves out
        config = {"r": 8, "lora_alpha": 8, **config}
    if engine == "vllm":
        missing = sorted({"r", "lora_alpha", "target_modules"} - raw.keys())
        if missing:
            raise EngineRefused(f"Missing required configuration fields: {', '.join(missing)}")
        if config.get("modules_to_save"):
            raise EngineRefused("vLLM only supports modules_to_save being None.")
        if config.get("use_dora"):
            raise EngineRefused("vLLM does not yet support DoRA.")
        if config.get("bias", "none") != "none":
            raise EngineRefused("vLLM does not support biases")
        if config["r"] > max_lora_rank:
            raise EngineRefused(f"LoRA rank {config['r']} is greater than max_lora_rank {max_lora_rank}.")
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas, ranks = {}, set()
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        if engine == "vllm" and A.shape[0] > max_lora_rank:
            raise EngineRefused(f"{key}: rank {A.shape[0]} does not fit max_lora_rank {max_lora_rank}")
        ranks.add(A.shape[0])
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        deltas[name] = scaling * (B.double() @ A.double())
    if engine in ("lorax", "tgi") and len(ranks) > 1:
        raise EngineRefused(f"cannot stack A/B of ranks {sorted(ranks)} into one tensor")
    return deltas


def serve(base: torch.nn.Module, folder, engine: str, **kwargs) -> torch.nn.Module:
    """A copy of ``base`` with the engine's ``ΔW`` added to each adapted weight (what its kernels compute)."""
    served = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in served_deltas(folder, engine, **kwargs).items():
            layer = served.get_submodule(name)
            update = delta.T if isinstance(layer, Conv1D) else delta
            layer.weight.add_(update.to(layer.weight.dtype))
    return served.eval()
