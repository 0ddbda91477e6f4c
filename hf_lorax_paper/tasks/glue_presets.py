"""The LoRA paper's GLUE hyperparameters (Hu et al. 2021, Table 9 / Appendix D.1) and results (Table 2).

Presets are named ``<setting>/<task>``: ``roberta-base/sst2``, ``roberta-large/rte``, and
``roberta-large-dagger/mrpc`` for the † rows of Table 2 (max length 128, batch 4, every task starting
from the pre-trained model). In the base and large settings, MRPC, RTE and STS-B start from the best MNLI
LoRA checkpoint (``init_from_mnli``): pass it with ``--init_adapter``.

All settings: AdamW, linear decay, warmup ratio 0.06, LoRA on ``query`` and ``value``, classifier trained.
Differences from the official ``microsoft/LoRA`` NLU scripts, which ``official_scripts=True`` selects:
the scripts use ``lora_alpha=16`` and ``weight_decay=0.1`` for RoBERTa-base too (the paper: alpha 8,
no weight decay listed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Table 2, GLUE dev (MNLI: matched accuracy; CoLA: Matthews; STS-B: Pearson; others: accuracy), x100.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "roberta-base": {"mnli": 87.5, "sst2": 95.1, "mrpc": 89.7, "cola": 63.4, "qnli": 93.3, "qqp": 90.8,
                     "rte": 86.6, "stsb": 91.5},
    "roberta-large": {"mnli": 90.6, "sst2": 96.2, "mrpc": 90.9, "cola": 68.2, "qnli": 94.9, "qqp": 91.6,
                      "rte": 87.4, "stsb": 92.6},
    "roberta-large-dagger": {"mnli": 90.6, "sst2": 96.2, "mrpc": 90.2, "cola": 68.2, "qnli": 94.8, "qqp": 91.6,
                             "rte": 85.2, "stsb": 92.3},
}
PAPER_AVERAGE = {"roberta-base": 87.2, "roberta-large": 89.0, "roberta-large-dagger": 88.6}
# Table 2's baseline rows: RoBERTa fine-tuning (FT) and BitFit (base only), same metrics, x100.
PAPER_BASELINES: dict[tuple[str, str], dict[str, float]] = {
    ("roberta-base", "full"): {"mnli": 87.6, "sst2": 94.8, "mrpc": 90.2, "cola": 63.6, "qnli": 92.8, "qqp": 91.9,
                               "rte": 78.7, "stsb": 91.2},
    ("roberta-base", "bitfit"): {"mnli": 84.7, "sst2": 93.7, "mrpc": 92.7, "cola": 62.0, "qnli": 91.8, "qqp": 84.0,
                                 "rte": 81.5, "stsb": 90.8},
    ("roberta-large", "full"): {"mnli": 90.2, "sst2": 96.4, "mrpc": 90.9, "cola": 68.0, "qnli": 94.7, "qqp": 92.2,
                                "rte": 86.6, "stsb": 92.4},
}
PAPER_METHOD_NAMES = {"lora": "LoRA", "full": "FT", "bitfit": "BitFit"}
PAPER_SOURCE = "LoRA paper (Hu et al. 2021), Table 2, GLUE dev"
PAPER_MODELS = {"roberta-base": "RoBERTa base", "roberta-large": "RoBERTa large", "roberta-large-dagger": "RoBERTa large"}
INIT_FROM_MNLI = ("mrpc", "rte", "stsb")


@dataclass(frozen=True)
class GluePreset:
    setting: str
    task: str
    model_name_or_path: str
    r: int
    lora_alpha: float
    batch_size: int
    epochs: float
    learning_rate: float
    max_length: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lora_dropout: float = 0.0
    init_from_mnli: bool = False
    target_modules: tuple[str, ...] = ("query", "value")
    targets: Any = None  # hf_lorax_paper.targets.Targets: what the run's model adapts (the scripts resolve it)

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.task}"

    @property
    def reference(self) -> float | None:
        return PAPER_RESULTS.get(self.setting, {}).get(self.task)


# task: (batch, epochs, lr) for base; (batch, epochs, lr, max_len) for large; (epochs, lr) for dagger
_BASE = {"mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
         "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 5e-4), "stsb": (16, 40, 4e-4)}
_LARGE = {"mnli": (4, 10, 3e-4, 128), "sst2": (4, 10, 4e-4, 128), "mrpc": (4, 20, 3e-4, 512),
          "cola": (4, 20, 2e-4, 128), "qnli": (4, 10, 2e-4, 512), "qqp": (4, 20, 3e-4, 512),
          "rte": (8, 20, 4e-4, 512), "stsb": (8, 30, 2e-4, 512)}
_DAGGER = {"mnli": (10, 3e-4), "sst2": (10, 4e-4), "mrpc": (20, 3e-4), "cola": (20, 2e-4), "qnli": (10, 2e-4),
           "qqp": (20, 3e-4), "rte": (20, 4e-4), "stsb": (10, 2e-4)}


def _build() -> dict[str, GluePreset]:
    presets = {}
    for task, (batch, epochs, lr) in _BASE.items():
        p = GluePreset("roberta-base", task, "roberta-base", 8, 8, batch, epochs, lr, 512,
                       init_from_mnli=task in INIT_FROM_MNLI)
        presets[p.name] = p
    for task, (batch, epochs, lr, length) in _LARGE.items():
        p = GluePreset("roberta-large", task, "roberta-large", 8, 16, batch, epochs, lr, length,
                       init_from_mnli=task in INIT_FROM_MNLI)
        presets[p.name] = p
    for task, (epochs, lr) in _DAGGER.items():
        p = GluePreset("roberta-large-dagger", task, "roberta-large", 8, 16, 4, epochs, lr, 128)
        presets[p.name] = p
    # `make demo`: a tiny pre-trained RoBERTa and an SST-2-shaped task, both built locally
    presets["demo/sst2"] = GluePreset("demo", "sst2", "", 8, 16, 32, 10, 1e-3, 64)  # 5e-3 diverged to one class
    return presets


PRESETS: dict[str, GluePreset] = _build()


def get_preset(name: str, official_scripts: bool = False) -> GluePreset:
    if name not in PRESETS:
        settings = sorted({p.setting for p in PRESETS.values()})
        raise ValueError(f"Unknown preset {name!r}: use <setting>/<task> with setting in {settings}, e.g. roberta-base/sst2.")
    preset = PRESETS[name]
    if official_scripts and preset.setting == "roberta-base":
        preset = replace(preset, lora_alpha=16, weight_decay=0.1)
    return preset


def paper_result(preset: GluePreset, method: str) -> tuple[str, float] | None:
    """The paper's Table 2 number for this preset's task with ``method``'s row (LoRA's for DoRA/QLoRA runs)."""
    if method in ("full", "bitfit"):
        value = PAPER_BASELINES.get((preset.setting, method), {}).get(preset.task)
        return (PAPER_METHOD_NAMES[method], value) if value is not None else None
    return ("LoRA", preset.reference) if preset.reference is not None else None
