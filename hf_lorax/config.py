"""Configuration classes: :class:`LoRAConfig` and :class:`DoRAConfig`.

They *are* ``peft.LoraConfig`` dataclasses, so ``peft.get_peft_model``, ``PeftModel``, transformers'
``add_adapter`` and the ``Trainer`` accept them unchanged. What they add:

* ``rank_map`` / ``alpha_map``: rank and alpha per module or layer range (see :mod:`hf_lorax.rank_map`),
  validated against the model and saved as peft ``rank_pattern`` / ``alpha_pattern`` with exact names;
* ``fused_slices``: adapt only some slices of a fused projection (see :mod:`hf_lorax.slices`);
* ``num_labels``: the label count :func:`hf_lorax.get_model` gives a classification head;
* hf_lorax's own tuner layers (:mod:`hf_lorax.layers`), registered through
  ``LoraConfig._register_custom_module``.

Saving writes a plain peft ``adapter_config.json`` (only peft's fields, so peft without hf_lorax reads
it without warnings) and a small ``hf_lorax.json`` beside it with the fields above, which hf_lorax reads
back when it loads the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, ClassVar, Optional, Union

from peft import LoraConfig

from .rank_map import load_module_map
from .slices import parse_fused_slices

SIDECAR_NAME = "hf_lorax.json"
SIDECAR_FORMAT = 1


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

    rank_map: Optional[Union[dict[str, int], str]] = field(
        default=None,
        metadata={
            "help": "Rank per module: {pattern: r}. Patterns match a suffix of the module name, support "
            "{a-b} layer ranges and * wildcards; first match wins; every key must match an adapted module. "
            "A path to a JSON file (e.g. suggested_rank_map.json) is accepted too."
        },
    )
    alpha_map: Optional[Union[dict[str, float], str]] = field(
        default=None, metadata={"help": "lora_alpha per module, same key syntax as rank_map."}
    )
    num_labels: Optional[int] = field(
        default=None, metadata={"help": "Number of labels for SEQ_CLS / TOKEN_CLS heads built by get_model."}
    )
    fused_slices: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "Adapt slices of fused projections, e.g. {'c_attn': ['q', 'v']} for GPT-2; saved as an "
            "equivalent block-structured standard LoRA."
        },
    )

    # hf_lorax's own fields: saved to hf_lorax.json, never to adapter_config.json
    extra_fields: ClassVar[tuple[str, ...]] = ("rank_map", "alpha_map", "num_labels", "fused_slices")

    def __post_init__(self):
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, Real):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} is outside [0, 1).")
        if self.num_labels is not None:
            _check_positive_int("num_labels", self.num_labels)
        self.rank_map = load_module_map(self.rank_map, what="rank_map")
        self.alpha_map = load_module_map(self.alpha_map, what="alpha_map")
        self._slice_specs = parse_fused_slices(self.fused_slices)
        if self.fused_slices is not None:
            self.fused_slices = {k: v if isinstance(v, dict) else list(v) for k, v in self.fused_slices.items()}
        super().__post_init__()
        # Module names resolved to fused-slice counts by the injection hook ({name: n_slices}).
        self._sliced_modules: dict[str, int] = {}
        from .layers import custom_module_mapping  # late import: layers import this module

        self._register_custom_module(custom_module_mapping())

    @property
    def method(self) -> str:
        """``"dora"`` or ``"lora"`` (``"qdora"`` / ``"qlora"`` for quantized configs)."""
        return "dora" if self.use_dora else "lora"

    def base_model_kwargs(self) -> dict:
        """Extra ``from_pretrained`` kwargs :func:`hf_lorax.get_model` uses to load the base (quantization)."""
        return {}

    def prepare_base_model(self, model):
        """Adjust the loaded base model before adapters are injected.

        Causal LMs get hf_lorax's causal-LM loss (:mod:`hf_lorax.loss`: same value, a fraction of the
        vocabulary-sized buffers); QLoRA adds k-bit preparation.
        """
        if self.task_type == "CAUSAL_LM":
            from .loss import install_causal_lm_loss

            install_causal_lm_loss(model)
        return model

    # -- saving -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The standard peft config dict: what ``adapter_config.json`` holds.

        hf_lorax's own fields are left out (they go to ``hf_lorax.json``), and modules adapted on fused
        slices report the rank and alpha of the equivalent full-module LoRA, so plain peft rebuilds them.
        """
        out = super().to_dict()
        for name in self.extra_fields:
            out.pop(name, None)
        out["rank_pattern"] = dict(out.get("rank_pattern") or {})
        out["alpha_pattern"] = dict(out.get("alpha_pattern") or {})
        for module, n in self._sliced_modules.items():
            r = self.rank_pattern.get(module, self.r)
            alpha = self.alpha_pattern.get(module, self.lora_alpha)
            out["rank_pattern"][module] = n * r
            out["alpha_pattern"][module] = fused_alpha(alpha, n, self.use_rslora)
        return out

    def sidecar(self) -> dict:
        """What ``hf_lorax.json`` holds."""
        from . import __version__

        return {
            "format_version": SIDECAR_FORMAT,
            "hf_lorax_version": __version__,
            "config_class": type(self).__name__,
            "method": self.method,
            **{name: getattr(self, name) for name in self.extra_fields},
            "sliced_modules": dict(self._sliced_modules),
        }

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        with open(os.path.join(save_directory, SIDECAR_NAME), "w", encoding="utf-8") as f:
            json.dump(self.sidecar(), f, indent=2, sort_keys=True)


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


def fused_alpha(alpha: float, n_slices: int, use_rslora: bool) -> float:
    """Alpha of the rank ``n*r`` LoRA that keeps the per-slice scaling ``alpha/r`` (or ``alpha/sqrt(r)``)."""
    return alpha * (math.sqrt(n_slices) if use_rslora else n_slices)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0.")


def _check_positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0.")


# -- loading ----------------------------------------------------------------------------------------------

CONFIG_CLASSES: dict[str, type[LoRAConfig]] = {"LoRAConfig": LoRAConfig, "DoRAConfig": DoRAConfig}


def read_sidecar(directory: str) -> dict | None:
    """The ``hf_lorax.json`` of a local adapter directory, or None if it has none."""
    path = os.path.join(directory, SIDECAR_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to load the adapter as plain peft LoRA.") from exc
    if not isinstance(data, dict) or data.get("format_version") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not an hf_lorax sidecar of format {SIDECAR_FORMAT}.")
    return data


def from_peft_config(config: LoraConfig, sidecar: dict) -> LoRAConfig:
    """Rebuild the hf_lorax config that wrote ``sidecar`` from the peft config read beside it."""
    name = sidecar.get("config_class", "LoRAConfig")
    if name not in CONFIG_CLASSES and name.startswith("Q"):
        from . import quantization  # noqa: F401  (registers QLoRAConfig)
    if name not in CONFIG_CLASSES:
        raise ValueError(f"hf_lorax.json names config class {name!r}; known: {sorted(CONFIG_CLASSES)}.")
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    if isinstance(kwargs.get("target_modules"), set):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    # adapter_config.json states fused-slice modules as full-module LoRAs of rank n*r; undo that.
    rank_pattern, alpha_pattern = dict(kwargs["rank_pattern"] or {}), dict(kwargs["alpha_pattern"] or {})
    for module, n in (sidecar.get("sliced_modules") or {}).items():
        if module in rank_pattern:
            rank_pattern[module] //= n
        if module in alpha_pattern:
            alpha_pattern[module] /= math.sqrt(n) if kwargs["use_rslora"] else n
    kwargs.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    cls = CONFIG_CLASSES[name]
    kwargs.update({extra: sidecar[extra] for extra in cls.extra_fields if extra in sidecar})
    return cls(**kwargs)
