"""QLoRA / QDoRA helpers: preparing a quantized base for training, storage figures, merging.

The config class, :class:`hf_lorax.QLoRAConfig`, lives in :mod:`hf_lorax.config`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZED_LINEAR_NAMES = frozenset({"Linear4bit", "Linear8bitLt"})


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Make a quantized base trainable under adapters, keeping its memory footprint.

    peft's ``prepare_model_for_kbit_training`` casts every non-quantized parameter to float32
    (peft#3265, #1149): on a bf16 model that doubles the embeddings, norms and head. Training adapters
    needs much less: frozen base parameters and no in-place weight repacking on CPU. Layer norms stay in
    the dtype they were loaded in; bitsandbytes computes the 4-bit matmuls in the compute dtype. Inputs
    that require grad (which reentrant gradient checkpointing needs) are left to transformers: its
    ``gradient_checkpointing_enable`` turns them on when checkpointing is on; a hook installed here
    unconditionally would break ``torch.compile`` graphs for every run.
    """
    if not any(is_quantized_linear(m) for m in model.modules()):
        raise ValueError("The base model has no bitsandbytes-quantized linear layers to train on: QLoRA needs a "
                         "model loaded with a BitsAndBytesConfig (get_model does this from a QLoRAConfig), and one "
                         "with nn.Linear layers.")
    model.requires_grad_(False)
    disable_cpu_repacking(model)
    return model


def disable_cpu_repacking(module: nn.Module) -> None:
    """Turn off bitsandbytes' in-place repacking of 4-bit weights on CPUs with AVX512-BF16.

    bitsandbytes' CPU backend there repacks a 4-bit weight in place on the first no-grad forward, after which every
    training step fails ("a view of a leaf Variable ... in-place operation"): a ``Trainer`` with
    ``eval_strategy="steps"`` could not train on after evaluating.
    """
    for layer in module.modules():
        if is_quantized_linear(layer) and getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear (checked by name: bitsandbytes need not be importable)."""
    return type(module).__module__.split(".")[0] == "bitsandbytes" and type(module).__name__ in QUANTIZED_LINEAR_NAMES


def quantized_bytes_per_param(model: nn.Module) -> float | None:
    """Storage bytes per parameter of the 4-bit linears (packed weights + quantization constants)."""
    import bitsandbytes as bnb

    params = nbytes = 0
    for weight in (module.weight for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)):
        state = weight.quant_state
        stored = [weight] if state is None else [weight, state.absmax, state.code]
        if state is not None and state.nested:  # double quantization: the constants' own constants
            stored += [state.state2.absmax, state.state2.code, state.offset]
        params += weight.numel() * 2 if state is None else int(torch.Size(state.shape).numel())  # packed: 2 a byte
        nbytes += sum(t.numel() * t.element_size() for t in stored if isinstance(t, torch.Tensor))
    return nbytes / params if params else None


def merge_and_unload(model, requantize: bool = False):
    """``model.merge_and_unload()``: a dense model in the compute dtype with the adapters merged.

    hf_lorax's quantized layers merge into de-quantized ``nn.Linear`` layers, so the result is exact up to
    the compute dtype. ``requantize=True`` quantizes the merged linears back to 4-bit NF4, which adds a new
    rounding error on top of the adapter (peft#2321) and is warned about.
    """
    merged = model.merge_and_unload()
    if not requantize:
        return merged
    warnings.warn("Re-quantizing merged weights is lossy: the merged update is rounded to the 4-bit grid, so "
                  "outputs differ from the unmerged QLoRA model (peft#2321). Prefer saving the dense merged model.",
                  UserWarning, stacklevel=2)
    import bitsandbytes as bnb

    for name, child in list(merged.named_modules(remove_duplicate=False)):
        if type(child) is nn.Linear and getattr(child, "_hf_lorax_merged", False):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=child.weight.dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            merged.set_submodule(name, q.to(child.weight.device))
    return merged
