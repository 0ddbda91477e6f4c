"""The LoRA paper's E2E NLG setup (Hu et al. 2021, Table 11 / Appendix D.3) and results (Table 3).

Presets ``gpt2-medium/e2e`` and ``gpt2-large/e2e``: AdamW with weight decay 0.01, batch 8, 5 epochs,
500 warmup steps, linear decay, learning rate 2e-4, LoRA r=4 on the q and v slices of every ``c_attn``
(393,216 trainable parameters on GPT-2 medium, 737,280 on large), alpha 32, dropout 0.1, label smoothing
0.1, max length 512; decoding with beam 10, length penalty 0.9, no repeated 4-grams, at most 64 new tokens.
The ``microsoft/LoRA`` README decodes with length penalty 0.8 (``--length_penalty`` overrides).

The paper's numbers are means over 3 seeds on the E2E test set (630 MRs), in the official scorer's units
with BLEU, METEOR and ROUGE-L x100 as printed in Table 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PAPER_SOURCE = "LoRA paper (Hu et al. 2021), Table 3, E2E NLG test set (mean of 3 seeds)"
PAPER_MODELS = {"gpt2-medium": "GPT-2 medium", "gpt2-large": "GPT-2 large"}  # the model behind each setting's rows
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
SCALED_X100 = ("BLEU", "METEOR", "ROUGE_L")  # printed x100 in Table 3; the scorer reports them in [0, 1]


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 3: trainable parameters (millions) and the five metrics as the paper prints them."""

    method: str
    trainable_params_m: float
    BLEU: float
    NIST: float
    METEOR: float
    ROUGE_L: float
    CIDEr: float

    def metrics(self) -> dict[str, float]:
        """In the scorer's units (BLEU / METEOR / ROUGE-L in [0, 1])."""
        return {m: round(getattr(self, m) / 100, 6) if m in SCALED_X100 else getattr(self, m) for m in METRICS}


PAPER_RESULTS: dict[str, tuple[PaperRow, ...]] = {
    "gpt2-medium": (PaperRow("LoRA", 0.35, 70.4, 8.85, 46.8, 71.8, 2.53),
                    PaperRow("FT", 354.92, 68.2, 8.62, 46.2, 71.0, 2.47)),
    "gpt2-large": (PaperRow("LoRA", 0.77, 70.4, 8.89, 46.8, 72.0, 2.47),
                   PaperRow("FT", 774.03, 68.5, 8.78, 46.0, 69.9, 2.45)),
}


@dataclass(frozen=True)
class E2EPreset:
    setting: str
    model_name_or_path: str
    task: str = "e2e"
    r: int = 4
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    batch_size: int = 8
    epochs: float = 5
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    label_smoothing: float = 0.1
    max_length: int = 512
    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    target_modules: tuple[str, ...] = ("c_attn",)
    slices: tuple[str, ...] = field(default=("q", "v"))  # of the fused c_attn (q, k, v)
    targets: Any = None  # hf_lorax_paper.targets.Targets: what the run's model adapts (the scripts resolve it)

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.task}"

    @property
    def paper_rows(self) -> tuple[PaperRow, ...]:
        return PAPER_RESULTS.get(self.setting, ())

    @property
    def reference(self) -> PaperRow | None:
        """The paper's LoRA row for this model, if any."""
        return next((row for row in self.paper_rows if row.method == "LoRA"), None)


PRESETS: dict[str, E2EPreset] = {
    p.name: p for p in (E2EPreset("gpt2-medium", "gpt2-medium"), E2EPreset("gpt2-large", "gpt2-large"))
}


def get_preset(name: str) -> E2EPreset:
    if name not in PRESETS:
        raise ValueError(f"Unknown E2E preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]
