"""Configuration classes: :class:`LoRAConfig`, :class:`DoRAConfig` and :class:`QLoRAConfig`.

They *are* ``peft.LoraConfig`` dataclasses, so ``peft.get_peft_model``, ``PeftModel``, transformers'
``add_adapter`` and the ``Trainer`` accept them unchanged. What they add:

* ``rank_map`` / ``alpha_map``: rank and alpha per module or layer range (see :mod:`hf_lorax.rank_map`),
  validated against the model and saved as peft ``rank_pattern`` / ``alpha_pattern`` with exact names;
* ``fused_slices``: adapt only some slices of a fused projection (see :mod:`hf_lorax.slices`);
* ``num_labels``: the label count :func:`hf_lorax.get_model` gives a classification head;
* for :class:`QLoRAConfig`, the bitsandbytes quantization of the base.

A config the user builds is a *description*: it is validated on construction and never changed afterwards by
hf_lorax. What it means for one concrete model (exact rank and alpha per module, slices, task head) is the
:class:`~hf_lorax.plan.AdapterPlan` that :func:`hf_lorax.plan.resolve` computes. peft only ever holds a
*resolved* copy (:meth:`LoRAConfig.with_plan`, made by :func:`hf_lorax.get_model` and by the peft hook): plain
peft state, where ``rank_pattern`` / ``alpha_pattern`` name every module whose rank or alpha differs from
``r`` / ``lora_alpha`` exactly (fused-slice modules with their full-module rank ``n*r``), and ``rank_map``,
``alpha_map`` and ``fused_slices`` are ``None``: what they described is kept in :attr:`LoRAConfig.resolved_from`
(what ``hf_lorax.json`` holds), outside peft's fields. So ``dataclasses.replace`` (peft's
``add_weighted_adapter``), ``to_dict`` and a saved ``adapter_config.json`` all carry plain peft meaning, and a
config read back from a folder is again such a resolved config.

This module imports only the two pure leaf modules :mod:`~hf_lorax.rank_map` and :mod:`~hf_lorax.slices`.
Saving writes a plain peft ``adapter_config.json`` (only peft's fields, so peft without hf_lorax reads it
without warnings) and a small ``hf_lorax.json`` beside it (:mod:`hf_lorax.adapter_files` reads it back).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, ClassVar, Optional, Union

from peft import LoraConfig

from ._version import __version__
from .rank_map import load_module_map
from .slices import SliceSpec, parse_fused_slices, spec_for

SIDECAR_NAME = "hf_lorax.json"
SIDECAR_FORMAT = 1

# Every hf_lorax config class by name, filled by ``LoRAConfig.__init_subclass__``; ``hf_lorax.json`` names one.
CONFIG_CLASSES: dict[str, type[LoRAConfig]] = {}


@dataclass
class LoRAConfig(LoraConfig):
    """LoRA configuration with per-layer rank maps and fused-projection slices.

    Every ``peft.LoraConfig`` argument works as documented by peft (``r``, ``lora_alpha``,
    ``target_modules``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights`` = ``True`` /
    ``"gaussian"`` / ``"pissa"``, ``modules_to_save``, ...).

    Example::

        from hf_lorax import LoRAConfig, get_model

        config = LoRAConfig(
            base_model_name_or_path="gpt2-medium", task_type="CAUSAL_LM",
            r=4, lora_alpha=32, target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]},
            rank_map={"h.{0-11}.attn.c_attn": 8},
        )
        model = get_model(config)
    """

    rank_map: Optional[Union[dict[str, int], str]] = field(default=None, metadata={
        "help": "Rank per module: {pattern: r}. Patterns match a suffix of the module name, support {a-b} layer "
                "ranges and * wildcards; first match wins; every key must match an adapted module. A path to a "
                "JSON file (e.g. suggested_rank_map.json) is accepted too."})
    alpha_map: Optional[Union[dict[str, float], str]] = field(default=None, metadata={
        "help": "lora_alpha per module, same key syntax as rank_map."})
    num_labels: Optional[int] = field(default=None, metadata={
        "help": "Number of labels for SEQ_CLS / TOKEN_CLS heads built by get_model."})
    pad_token_id: Optional[int] = field(default=None, metadata={
        "help": "SEQ_CLS: the pad id a decoder's classifier finds each row's last token by. Recorded from the model "
                "when hf_lorax injects (its own, else eos) and saved; a base model loaded for the adapter gets it."})
    fused_slices: Optional[dict[str, Any]] = field(default=None, metadata={
        "help": "Adapt slices of fused projections, e.g. {'c_attn': ['q', 'v']} for GPT-2; saved as an "
                "equivalent block-structured standard LoRA."})

    # hf_lorax's own fields: saved to hf_lorax.json, never to adapter_config.json
    extra_fields: ClassVar[tuple[str, ...]] = ("rank_map", "alpha_map", "num_labels", "pad_token_id", "fused_slices")
    # the fields a resolved config moves out of peft's view (into ``resolved_from``): they are resolved already
    description_fields: ClassVar[tuple[str, ...]] = ("rank_map", "alpha_map", "fused_slices")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIG_CLASSES[cls.__name__] = cls

    def __post_init__(self):
        _check_positive("r", self.r, int)
        _check_positive("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, Real):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} is outside [0, 1).")
        if self.num_labels is not None:
            _check_positive("num_labels", self.num_labels, int)
        self.rank_map = load_module_map(self.rank_map, what="rank_map")
        self.alpha_map = load_module_map(self.alpha_map, what="alpha_map")
        parse_fused_slices(self.fused_slices)  # validates
        if self.fused_slices is not None:
            self.fused_slices = {k: v if isinstance(v, dict) else list(v) for k, v in self.fused_slices.items()}
        super().__post_init__()
        # Plain attributes, not dataclass fields: peft's to_dict and dataclasses.replace never see them.
        # The AdapterPlan this config was resolved with (hf_lorax.plan): only on copies ``with_plan`` makes.
        self.resolved_plan = None
        # On a resolved config (made by ``with_plan`` or read from a folder): the description it came from, as
        # hf_lorax.json holds it (rank_map, alpha_map, fused_slices, sliced_modules, slice_layouts). None on a
        # description the user built.
        self.resolved_from: dict | None = None

    @property
    def method(self) -> str:
        """``"dora"`` or ``"lora"`` (``"qdora"`` / ``"qlora"`` for quantized configs)."""
        return "dora" if self.use_dora else "lora"

    @property
    def is_resolved(self) -> bool:
        """Whether this is plain peft state (a resolved copy, or a config read from a saved folder)."""
        return self.resolved_from is not None

    @property
    def slice_specs(self) -> dict[str, SliceSpec]:
        """``fused_slices`` parsed into one :class:`~hf_lorax.slices.SliceSpec` per key (of the description a
        resolved config came from, limited to its sliced modules with their saved row structure)."""
        if not self.is_resolved:
            return parse_fused_slices(self.fused_slices)
        if layouts := self.resolved_from.get("slice_layouts"):
            return parse_fused_slices(layouts)
        sliced = self.resolved_from.get("sliced_modules") or {}
        described = parse_fused_slices(self.resolved_from.get("fused_slices"))
        return {name: spec for name in sliced if (spec := spec_for(name, described)) is not None}

    def base_model_kwargs(self) -> dict:
        """Extra ``from_pretrained`` kwargs :func:`hf_lorax.get_model` uses to load the base (quantization, pad id)."""
        return {} if self.pad_token_id is None else {"pad_token_id": self.pad_token_id}

    def with_plan(self, plan) -> LoRAConfig:
        """The resolved copy of this config for ``plan``: plain peft state (see the module docstring).

        This is what peft holds; ``self`` is left as it was.
        """
        resolved = copy.deepcopy(self)
        source = _recorded(self.resolved_from or vars(self))
        source["sliced_modules"] = dict(plan.sliced_modules)
        source["slice_layouts"] = {name: m.slices.as_dict() for name, m in plan.modules.items() if m.slices is not None}
        for name in self.description_fields:
            setattr(resolved, name, None)
        resolved.rank_pattern, resolved.alpha_pattern = dict(plan.rank_pattern), dict(plan.alpha_pattern)
        resolved.modules_to_save = list(plan.modules_to_save) if plan.modules_to_save else None
        resolved.target_modules = resolved.target_modules if plan.target_modules is None else plan.target_modules
        resolved.fan_in_fan_out = resolved.fan_in_fan_out or plan.fan_in_fan_out
        resolved.resolved_from, resolved.resolved_plan = source, plan
        return resolved

    # -- saving -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The standard peft config dict: what ``adapter_config.json`` holds (hf_lorax's own fields left out;
        they go to ``hf_lorax.json``). For a resolved config it is exactly the state peft builds layers from."""
        return {name: value for name, value in super().to_dict().items() if name not in self.extra_fields}

    def sidecar(self) -> dict:
        """What ``hf_lorax.json`` holds."""
        # (a resolved config's description fields, from ``resolved_from``, replace its Nones)
        return {"format_version": SIDECAR_FORMAT, "hf_lorax_version": __version__,
                "config_class": type(self).__name__, "method": self.method,
                **{name: getattr(self, name) for name in self.extra_fields},
                **_recorded(self.resolved_from or vars(self))}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        with open(os.path.join(save_directory, SIDECAR_NAME), "w", encoding="utf-8") as f:
            json.dump(self.sidecar(), f, indent=2, sort_keys=True)

    @classmethod
    def from_peft_config(cls, config: LoraConfig, sidecar: dict) -> LoRAConfig:
        """The resolved hf_lorax config of a saved folder: ``config`` (its ``adapter_config.json``) unchanged as
        peft state, with ``sidecar`` (its ``hf_lorax.json``) as :attr:`resolved_from`."""
        name = sidecar.get("config_class", "LoRAConfig")
        if name not in CONFIG_CLASSES:
            raise ValueError(f"hf_lorax.json names config class {name!r}; known: {sorted(CONFIG_CLASSES)}.")
        target = CONFIG_CLASSES[name]
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        out = target(**kwargs, **{extra: sidecar[extra] for extra in target.extra_fields  # not peft fields
                                  if extra in sidecar and extra not in target.description_fields})
        out.target_modules = config.target_modules  # as peft read it (a set), not re-normalised
        out.resolved_from = _recorded(sidecar)
        return out


CONFIG_CLASSES["LoRAConfig"] = LoRAConfig


def _recorded(source: dict) -> dict:
    """What :attr:`LoRAConfig.resolved_from` and ``hf_lorax.json`` record of a description, read from ``source``:
    a saved ``hf_lorax.json``, a resolved config's ``resolved_from``, or a description's own attributes (``vars``)."""
    return {**{name: source.get(name) for name in LoRAConfig.description_fields},
            **{name: dict(source.get(name) or {}) for name in ("sliced_modules", "slice_layouts")}}


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA (weight-decomposed LoRA, Liu et al. 2024) with the same rank maps and slices as :class:`LoRAConfig`.

    hf_lorax's DoRA computes the column norm of ``W + s·BA`` from the factors, without forming ``BA``,
    and detaches it as the DoRA paper (§4.3) recommends. Saved adapters are peft DoRA adapters.

    Example::

        config = DoRAConfig(base_model_name_or_path="roberta-base", task_type="SEQ_CLS", num_labels=2,
                            r=8, lora_alpha=16, target_modules=["query", "value"],
                            rank_map={"layer.{0-5}.attention.self.query": 16, "layer.{6-11}.*": 4})
    """

    use_dora: bool = field(default=True, metadata=LoraConfig.__dataclass_fields__["use_dora"].metadata)

    def __post_init__(self):
        if not self.use_dora:
            raise ValueError("DoRAConfig(use_dora=False) is a plain LoRA: use LoRAConfig instead.")
        super().__post_init__()


# Names of the compute dtypes (torch is imported only where a dtype object is needed).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")
# Task heads stay unquantized: they are trained in full (a quantized weight cannot require grad).
UNQUANTIZED_HEADS = ("lm_head", "score", "classifier", "pre_classifier", "qa_outputs")


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA (or, with ``use_dora=True``, DoRA) on a bitsandbytes-quantized base: QLoRA / QDoRA.

    :func:`hf_lorax.get_model` loads the base with the ``BitsAndBytesConfig`` this config builds, prepares it
    for training without upcasting frozen weights (:mod:`hf_lorax.quantization`), and wraps
    ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` with hf_lorax's layers (rank maps and fused slices included).

    Example::

        config = QLoRAConfig(base_model_name_or_path="gpt2-medium", task_type="CAUSAL_LM",
                             r=4, lora_alpha=32, target_modules=["c_attn"], quant_type="nf4",
                             double_quant=True, compute_dtype="bfloat16")
        model = get_model(config)

    On CUDA, pair it with ``optim="paged_adamw_8bit"`` in ``TrainingArguments`` for paged 8-bit AdamW.
    For FSDP, set ``quant_storage`` to the compute dtype (FSDP shards one dtype per module).
    """

    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants too."})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32."})
    quant_storage: str = field(default="uint8", metadata={"help": "Storage dtype of packed 4-bit weights."})
    load_in_8bit: bool = field(default=False, metadata={"help": "LLM.int8() base instead of 4-bit."})

    extra_fields: ClassVar[tuple[str, ...]] = (
        *LoRAConfig.extra_fields, "quant_type", "double_quant", "compute_dtype", "quant_storage", "load_in_8bit")

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r}: use 'nf4' or 'fp4'.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use one of {sorted(COMPUTE_DTYPES)}.")
        if self.quant_storage not in QUANT_STORAGE:
            raise ValueError(f"quant_storage={self.quant_storage!r}: use one of {list(QUANT_STORAGE)}.")
        super().__post_init__()

    @property
    def method(self) -> str:
        return "qdora" if self.use_dora else "qlora"

    def bnb_config(self):
        """The transformers ``BitsAndBytesConfig`` for the base (it turns the dtype names into torch dtypes)."""
        from transformers import BitsAndBytesConfig

        skip = sorted(set(UNQUANTIZED_HEADS) | set(self.modules_to_save or []))
        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True, llm_int8_skip_modules=skip, bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_quant_storage=self.quant_storage)

    def base_model_kwargs(self) -> dict:
        import torch

        return {**super().base_model_kwargs(), "quantization_config": self.bnb_config(),
                "dtype": getattr(torch, self.compute_dtype)}

    def sidecar(self) -> dict:
        quantization = "bitsandbytes LLM.int8()" if self.load_in_8bit else (
            f"bitsandbytes {self.quant_type.upper()}{', double quantization' if self.double_quant else ''}, "
            f"compute dtype {self.compute_dtype}")
        return {**super().sidecar(), "quantization": quantization}


def _check_positive(name: str, value, kind: type = Real) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0.")
