"""QLoRA / QDoRA: a 4-bit (NF4/FP4, double quantization) or 8-bit base with hf_lorax adapters on top."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .config import CONFIG_CLASSES, LoRAConfig

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Task heads stay unquantized: they are trained in full (a quantized weight cannot require grad).
UNQUANTIZED_HEADS = ("lm_head", "score", "classifier", "pre_classifier", "qa_outputs")


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA (or, with ``use_dora=True``, DoRA) on a bitsandbytes-quantized base: QLoRA / QDoRA.

    :func:`hf_lorax.get_model` loads the base with the ``BitsAndBytesConfig`` this config builds, prepares it
    for training without upcasting frozen weights, and wraps ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` with
    hf_lorax's layers (rank maps and fused slices included).

    Example::

        config = QLoRAConfig(base_model_name_or_path="gpt2-medium", task_type="CAUSAL_LM",
                             r=4, lora_alpha=32, target_modules=["c_attn"], quant_type="nf4",
                             double_quant=True, compute_dtype="bfloat16")
        model = get_model(config)

    On CUDA, pair it with ``optim="paged_adamw_8bit"`` in ``TrainingArguments`` (or
    ``create_loraplus_optimizer(..., optimizer_cls=bnb.optim.PagedAdamW8bit)``) for paged 8-bit AdamW.
    """

    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants too."})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32."})
    quant_storage: str = field(default="uint8", metadata={"help": "Storage dtype of packed 4-bit weights."})
    load_in_8bit: bool = field(default=False, metadata={"help": "LLM.int8() base instead of 4-bit."})

    extra_fields: ClassVar[tuple[str, ...]] = LoRAConfig.extra_fields + (
        "quant_type", "double_quant", "compute_dtype", "quant_storage", "load_in_8bit",
    )

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r}: use 'nf4' or 'fp4'.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use one of {sorted(COMPUTE_DTYPES)}.")
        if self.quant_storage not in ("uint8", "bfloat16", "float16", "float32"):
            raise ValueError(f"quant_storage={self.quant_storage!r}: use uint8, bfloat16, float16 or float32.")
        super().__post_init__()

    @property
    def method(self) -> str:
        return "qdora" if self.use_dora else "qlora"

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def bnb_config(self):
        """The transformers ``BitsAndBytesConfig`` for the base."""
        from transformers import BitsAndBytesConfig

        skip = sorted(set(UNQUANTIZED_HEADS) | set(self.modules_to_save or []))
        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True, llm_int8_skip_modules=skip, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_compute_dtype, bnb_4bit_quant_storage=COMPUTE_DTYPES.get(self.quant_storage, torch.uint8),
        )

    def base_model_kwargs(self) -> dict:
        return {"quantization_config": self.bnb_config(), "dtype": self.torch_compute_dtype}

    def prepare_base_model(self, model: nn.Module) -> nn.Module:
        return prepare_for_kbit_training(super().prepare_base_model(model))

    def sidecar(self) -> dict:
        data = super().sidecar()
        data["quantization"] = (
            "bitsandbytes LLM.int8()" if self.load_in_8bit else
            f"bitsandbytes {self.quant_type.upper()}{', double quantization' if self.double_quant else ''}, "
            f"compute dtype {self.compute_dtype}"
        )
        return data


CONFIG_CLASSES["QLoRAConfig"] = QLoRAConfig


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Make a quantized base trainable under adapters, keeping its memory footprint.

    peft's ``prepare_model_for_kbit_training`` casts every non-quantized parameter to float32
    (peft#3265, #1149): on a bf16 model that doubles the embeddings, norms and head. Training adapters
    needs much less: frozen base parameters, inputs that require grad (so gradient checkpointing
    propagates to the adapters), and no in-place weight repacking on CPU. Layer norms stay in the
    dtype they were loaded in; bitsandbytes computes the 4-bit matmuls in the compute dtype.
    """
    from .layers.bnb import disable_cpu_repacking

    if not _is_quantized(model):
        raise ValueError(
            "The base model has no bitsandbytes-quantized linear layers to train on: QLoRA needs a model loaded "
            "with a BitsAndBytesConfig (get_model does this from a QLoRAConfig), and one with nn.Linear layers."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    disable_cpu_repacking(model)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def _is_quantized(model: nn.Module) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def quantized_bytes_per_param(model: nn.Module) -> float | None:
    """Storage bytes per parameter of the 4-bit linears (packed weights + quantization constants)."""
    import bitsandbytes as bnb

    params = nbytes = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        state = weight.quant_state
        params += int(torch.Size(state.shape).numel()) if state is not None else weight.numel() * 2
        nbytes += weight.numel() * weight.element_size()
        if state is not None:
            nbytes += _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
            if state.nested:
                nbytes += _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.state2.code) + _tensor_bytes(state.offset)
    return nbytes / params if params else None


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def merge_and_unload(model, requantize: bool = False):
    """``model.merge_and_unload()``: a dense model in the compute dtype with the adapters merged.

    hf_lorax's quantized layers merge into de-quantized ``nn.Linear`` layers, so the result is exact up to
    the compute dtype. ``requantize=True`` quantizes the merged linears back to 4-bit NF4, which adds a new
    rounding error on top of the adapter (peft#2321) and is warned about.
    """
    merged = model.merge_and_unload()
    if requantize:
        warnings.warn(
            "Re-quantizing merged weights is lossy: the merged update is rounded to the 4-bit grid, so outputs "
            "differ from the unmerged QLoRA model (peft#2321). Prefer saving the dense merged model.",
            UserWarning, stacklevel=2,
        )
        _requantize_linears(merged)
    return merged


def _requantize_linears(model: nn.Module) -> None:
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and getattr(child, "_hf_lorax_merged", False):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(child.weight.device))
