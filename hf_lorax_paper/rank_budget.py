"""``--rank_map auto``: the two-stage recipe of the task scripts (probe, allocation, real run).

A short probe run trains a uniform-rank adapter (``--probe_r``, ``--probe_steps``) on the same data with the
same training arguments, saving and evaluating nothing; :func:`hf_lorax.analysis.allocation.allocate` turns its
spectra (``--signal energy``) or the loss sensitivity its ``RankUtilizationCallback`` gathered (``--signal
sensitivity``) into a rank map for ``--rank_budget`` LoRA parameters (or ``--rank_budget_ratio`` of the probe's); the
real run then trains a fresh adapter with that map. ``results.json`` records it under ``rank_allocation``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"


@dataclass
class RankBudgetArguments:
    """The flags of ``--rank_map auto`` (mixed into :class:`hf_lorax_paper.experiment.MethodArguments`)."""

    rank_budget: int | None = field(default=None, metadata={"help": "--rank_map auto: LoRA parameters of the map"})
    rank_budget_ratio: float | None = field(default=None, metadata={
        "help": "--rank_map auto: budget as a fraction of the probe adapter's LoRA parameters"})
    probe_steps: int | None = field(default=None, metadata={"help": "--rank_map auto: optimizer steps of the probe"})
    probe_r: int = field(default=16, metadata={"help": "--rank_map auto: uniform rank of the probe"})
    alpha_policy: str = field(default="scaling", metadata={"help": "--rank_map auto: scaling, alpha or rslora"})
    signal: str = field(default="energy", metadata={
        "help": "--rank_map auto: value of a direction, energy (update spectrum) or sensitivity (loss)"})


def check_arguments(method, adapter_methods: tuple[str, ...]) -> None:
    """Flags of the recipe without ``--rank_map auto``, or ``auto`` without a budget, raise ``ValueError``."""
    from hf_lorax.analysis.allocation import SIGNALS, check_alpha_policy, check_choice

    given = [f"--{k}" for k in ("rank_budget", "rank_budget_ratio", "probe_steps") if getattr(method, k) is not None]
    given += ["--signal"] if method.signal != "energy" else []
    if method.rank_map != AUTO:
        if given:
            raise ValueError(f"{given[0]} needs --rank_map auto.")
        return
    if method.method not in adapter_methods:
        raise ValueError(f"--rank_map auto allocates adapter ranks; --method {method.method} trains no adapter.")
    if (method.rank_budget is None) == (method.rank_budget_ratio is None):
        raise ValueError("--rank_map auto needs exactly one of --rank_budget N or --rank_budget_ratio F.")
    if not method.probe_steps or method.probe_steps < 1:
        raise ValueError("--rank_map auto needs --probe_steps K (K >= 1 optimizer steps of the probe run).")
    if method.probe_r < 1:
        raise ValueError(f"--probe_r {method.probe_r}: the probe rank must be >= 1.")
    check_alpha_policy(method.alpha_policy)
    check_choice("--signal", method.signal, SIGNALS)


def probe_training_args(args, steps: int, output_dir: str):
    """The run's training arguments for ``steps`` steps, with nothing saved, evaluated or reported."""
    return dataclasses.replace(args, max_steps=steps, output_dir=output_dir, save_strategy="no", eval_strategy="no",
                               load_best_model_at_end=False, report_to="none", push_to_hub=False,
                               resume_from_checkpoint=None)


def allocate_from_probe(plugin, build_model, preset, method, data, args, tokenizer, splits) -> dict[str, Any]:
    """Train the probe and allocate: ``{"overrides": {rank_map, alpha_map}, "record": {...}}``."""
    from transformers import set_seed

    from hf_lorax.analysis import RankUtilizationCallback
    from hf_lorax.analysis.allocation import allocate, allocate_ranks, budget_from_ratio, spectra_from_updates
    from hf_lorax.analysis.report import updates_from_model

    probe_method = dataclasses.replace(method, rank_map=None, r=method.probe_r, rank_utilization=False)
    # the probe trains at the run's scaling alpha/r, so "scaling" keeps the step size of the uniform run it replaces
    probe_preset = dataclasses.replace(preset, r=method.probe_r, lora_alpha=preset.lora_alpha * method.probe_r / preset.r)
    set_seed(args.seed)
    model = build_model(plugin, probe_preset, probe_method, data)
    inputs = plugin.trainer_inputs(tokenizer, probe_preset, probe_method, data, splits)
    trainer_class = inputs.pop("trainer_class")
    if method.rank_budget is not None:  # a budget below rank 1 everywhere fails before the probe trains
        allocate_ranks(spectra_from_updates(updates_from_model(model)), method.rank_budget)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_lorax_probe_") as scratch:
        trainer = trainer_class(model=model, args=probe_training_args(args, method.probe_steps, scratch), **inputs)
        recorder = RankUtilizationCallback(every_n_steps=method.probe_steps, plot=False).attach(trainer)
        trainer.train()
    seconds = time.perf_counter() - start
    sensitivity = recorder.sensitivity.scores() if recorder.sensitivity is not None else None
    spectra = spectra_from_updates(updates_from_model(model), sensitivity)
    budget = method.rank_budget if method.rank_budget is not None else budget_from_ratio(spectra, method.rank_budget_ratio)
    plan = allocate(spectra, budget, lora_alpha=preset.lora_alpha, alpha_policy=method.alpha_policy,
                    signal=method.signal)
    set_seed(args.seed)  # the real run starts from the seed, as without a probe
    record = {"probe_steps": method.probe_steps, "probe_r": method.probe_r, "probe_seconds": seconds,
              "budget_ratio": method.rank_budget_ratio, **plan.to_json()}
    return {"overrides": {"rank_map": plan.rank_map, "alpha_map": plan.alpha_map}, "record": record}


def plan_rank_map(plugin, experiment, tokenizer, splits, build_model, adapter_methods) -> dict:
    """``--rank_map auto``: the probe run and the allocation (``build_model`` is the runner's, passed in).

    Returns ``{"overrides": {rank_map, alpha_map}, "facts": {"rank_allocation": ...}}``; empty without ``auto``.
    """
    method = experiment.method
    check_arguments(method, adapter_methods)
    if method.rank_map != AUTO:
        return {"overrides": {}, "facts": {}}
    out = allocate_from_probe(plugin, build_model, experiment.preset, method, experiment.data, experiment.training,
                              tokenizer, splits)
    return {"overrides": out["overrides"], "facts": {"rank_allocation": out["record"]}}
