"""QLoRA / QDoRA helpers: a quantized base's CPU repacking turned off, merging into a dense model.

The config class, :class:`hf_lorax.QLoRAConfig`, lives in :mod:`hf_lorax.config`.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .class_swap import register_mixin

QUANTIZED_LINEAR_NAMES = frozenset({"Linear4bit", "Linear8bitLt"})


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


def merge_and_unload(model):
    """``model.merge_and_unload()``, then :func:`dequantized`: a dense model with the adapters merged."""
    return dequantized(model.merge_and_unload())


class DenseMergeLoraModel:
    """peft's ``LoraModel`` whose ``merge_and_unload`` returns a model dense throughout (:func:`dequantized`). The peft
    hook (:mod:`hf_lorax.hooks`) gives a ``LoraModel`` this class when it injects an hf_lorax config, so the model
    :func:`hf_lorax.get_model`, ``peft.get_peft_model`` or TRL builds merges the same way."""

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        return dequantized(super().merge_and_unload(*args, **kwargs))


register_mixin("DenseMerge", DenseMergeLoraModel, "peft")


def dequantized(merged: nn.Module) -> nn.Module:
    """A merged model whose base was quantized, made dense throughout, so it saves and reloads as a plain model.

    hf_lorax's quantized layers merge into de-quantized ``nn.Linear`` layers, exact up to the compute dtype (peft's
    re-quantize the merged weight, a new rounding error on top of the adapter, peft#2321). The layers no adapter
    touched stay quantized and the model's config still names the quantization, so the saved checkpoint would claim
    4-bit weights beside dense ones; transformers' ``dequantize`` turns the rest dense and drops that config. Both
    make ``nn.Linear`` layers; a layer that was a GPT-2 ``Conv1D`` (transformers records it as ``source_cls`` when it
    loads one 4-bit) becomes a ``Conv1D`` again, so the checkpoint has GPT-2's shapes. For a 4-bit merged model, save
    the dense one and load it with a ``BitsAndBytesConfig``, as any base model.
    """
    if getattr(merged, "hf_quantizer", None) is None:
        return merged
    conv1d = [name for name, module in merged.named_modules() if getattr(module, "source_cls", None) is Conv1D]
    merged = merged.dequantize()
    for name in conv1d:
        linear = merged.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight).requires_grad_(False)
        conv.weight.data, conv.bias.data = linear.weight.data.T.contiguous(), linear.bias.data
        merged.set_submodule(name, conv)
    return merged
