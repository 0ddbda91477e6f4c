"""``RankUtilizationCallback``: measure how much of each adapter's rank training really uses."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from ..adapter_files import write_json
from ..integrations.sharding import is_sharded
from .plots import plot_rank_utilization
from .report import ModuleStats, analyze, suggest_rank_map, summarize, updates_from_model
from .sensitivity import SensitivityTracker

logger = logging.getLogger(__name__)

JSON_NAME = "rank_utilization.json"
PNG_NAME = "rank_utilization.png"
SUGGESTION_NAME = "suggested_rank_map.json"
CONSOLE_KEYS = ("rank_utilization/mean", "rank_utilization/min")  # the summary the console shows
LOWEST_KEY = "rank_utilization/lowest"  # console only: the module using the least of its rank


class RankUtilizationCallback(TrainerCallback):
    """Log rank utilization through the Trainer's loggers and write a report at the end of training.

    Every ``every_n_steps`` optimizer steps (on the main process; under ZeRO-3 or FSDP2 every process first
    gathers the sharded factors, one layer at a time) the singular values of each adapter's
    ``ΔW = s·BA`` are computed from the factors (an r×r SVD per module), and a summary is logged through
    ``Trainer.log`` — so ``trainer.state.log_history``, and with :meth:`attach` TensorBoard, W&B and every
    other configured reporter, receive it: ``rank_utilization/mean``, ``/min``, per module type
    (``rank_utilization/type/query/mean``) and per layer (``rank_utilization/layer/3/mean``), plus every
    module when ``log_per_module``. With :meth:`attach`, the console line (``ProgressCallback`` /
    ``PrinterCallback``) shows only the mean, the minimum and the lowest module (:class:`ConsoleSummary`).
    At the end of training it writes, into ``output_dir`` (default: the run's ``args.output_dir``):
    ``rank_utilization.json`` (history and final per-module statistics),
    ``rank_utilization.png`` and ``suggested_rank_map.json``, which ``LoRAConfig(rank_map=path)`` accepts.

    With ``sensitivity=True`` (default) it also gathers, before every optimizer step, the loss sensitivity of each
    singular direction of each update (:mod:`hf_lorax.analysis.sensitivity`; not under ZeRO-3 or FSDP2, whose
    gradients are sharded). ``rank_utilization.json`` keeps it under ``"sensitivity"``, where
    ``python -m hf_lorax.analysis ADAPTER --budget N --signal sensitivity`` reads it.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        RankUtilizationCallback(every_n_steps=100).attach(trainer)  # first, so the reporters see its metrics
    """

    def __init__(self, every_n_steps: int = 100, output_dir: str | None = None, log_per_module: bool = True,
                 threshold: float = 0.9, plot: bool = True, sensitivity: bool = True):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer.")
        if isinstance(threshold, bool) or not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1].")
        self.every_n_steps, self.output_dir, self.log_per_module = every_n_steps, output_dir, log_per_module
        self.threshold, self.plot = threshold, plot
        self.sensitivity = SensitivityTracker() if sensitivity else None
        self.history: list[dict] = []
        self.latest: list[ModuleStats] = []
        self._pending: dict[str, float] = {}
        self._last_step: int | None = None  # the last step measured (on every process, for the collectives)
        self._attached = False

    def measure(self, model, step: int) -> dict[str, float]:
        """Analyze ``model``'s adapters now; returns the metrics to log (on one process: see the class doc)."""
        return self.record(analyze(updates_from_model(model)), step)

    def record(self, stats: list[ModuleStats], step: int) -> dict[str, float]:
        self.latest = stats
        summary = summarize(stats)
        self.history.append({"step": step, "summary": summary})
        per_module = {f"rank_utilization/module/{s.name}": s.utilization for s in stats} if self.log_per_module else {}
        return {**summary, **per_module}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            # every rank logs at this step: Trainer's logging gathers the loss across processes
            control.should_log = True
            self._measure_once(model, state)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.sensitivity is not None and model is not None and state.is_world_process_zero:
            self.sensitivity.update(model)

    def _measure_once(self, model, state) -> None:
        """Measure on the main process only. Sharded factors (ZeRO-3, FSDP2) are gathered by every process
        first (a collective), so every process takes the same steps here whatever its rank."""
        self._last_step = state.global_step
        if model is not None and (state.is_world_process_zero or is_sharded(model)):
            updates = updates_from_model(model)
            if state.is_world_process_zero:
                self._pending = self.record(analyze(updates), state.global_step)

    def attach(self, trainer) -> RankUtilizationCallback:
        """Put this callback first in ``trainer``'s callbacks (that trainer only), so that the reporters after
        it (TensorBoard, W&B, ...) receive its metrics too, and a :class:`ConsoleSummary` on each side of the
        console printer; returns the callback.

        ``Trainer(callbacks=[...])`` places user callbacks after the reporters, and a callback can only add
        metrics to the ``logs`` of a ``Trainer.log`` call the callbacks after it see.
        """
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [self] + [c for c in callbacks if c is not self and getattr(c, "owner", None) is not self]
        printer = next((i for i, c in enumerate(callbacks) if isinstance(c, (ProgressCallback, PrinterCallback))), None)
        if printer is not None:
            before = ConsoleSummary(self)
            callbacks[printer:printer + 1] = [before, callbacks[printer], ConsoleSummary(self, held=before.held)]
        self._attached = True
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sensitivity is not None and model is not None and is_sharded(model):  # decided once, not every step
            if state.is_world_process_zero:
                logger.warning("RankUtilizationCallback: no loss sensitivity under ZeRO-3 or FSDP2 (the gradients "
                               "are sharded); rank maps from this run can use signal 'energy' only.")
            self.sensitivity = None
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._attached and state.is_world_process_zero:
            logger.warning("RankUtilizationCallback's metrics reach trainer.state.log_history but not %s: the "
                           "reporters run before it. Use RankUtilizationCallback(...).attach(trainer) instead of "
                           "Trainer(callbacks=[...]).", ", ".join(reporters))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the pending metrics to this ``Trainer.log`` call: its ``logs`` (what the callbacks after this one
        receive) and the ``log_history`` entry the Trainer appended just before."""
        if self._pending and logs is not None:
            pending, self._pending = self._pending, {}
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self._last_step != state.global_step:  # the same answer on every process
            self._measure_once(model, state)
            self._pending = {}
        if state.is_world_process_zero:
            self.write(self.output_dir or args.output_dir, step=state.global_step)

    def write(self, directory: str, step: int | None = None) -> dict[str, str]:
        """Write the JSON report, the plot and the suggested rank map; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        report = {"every_n_steps": self.every_n_steps, "threshold": self.threshold, "history": self.history,
                  "modules": [asdict(s) for s in self.latest]}
        if self.sensitivity is not None and self.sensitivity.steps:
            report["sensitivity"] = self.sensitivity.to_json()
        elif self.sensitivity is not None and self.history:  # e.g. DeepSpeed ZeRO-1/2 keeps gradients to itself
            logger.warning("RankUtilizationCallback: no adapter gradients were visible before the optimizer steps, so "
                           "no loss sensitivity was recorded; rank maps from this run can use signal 'energy' only.")
        suggestion = {"rank_map": suggest_rank_map(self.latest, self.threshold), "threshold": self.threshold, "step": step}
        paths = {"json": write_json(os.path.join(directory, JSON_NAME), report),
                 "suggestion": write_json(os.path.join(directory, SUGGESTION_NAME), suggestion)}
        if self.plot and self.latest:
            paths["png"] = plot_rank_utilization(self.latest, self.history, os.path.join(directory, PNG_NAME),
                                                 title=f"rank utilization at step {step}")
        return paths


class ConsoleSummary(TrainerCallback):
    """Keeps the console line to the summary. Placed right before the Trainer's printer, it takes the per-type,
    per-layer and per-module metrics out of ``logs`` and adds the lowest module; a second one (``held``: the
    first one's) right after the printer puts them back, so callbacks after the printer receive them too."""

    def __init__(self, owner: RankUtilizationCallback, held: dict | None = None):
        self.owner, self.restores = owner, held is not None
        self.held: dict = {} if held is None else held

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.restores:
            logs.pop(LOWEST_KEY, None)
            logs.update(self.held)
            self.held.clear()
        elif logs is not None:
            detail = [k for k in logs if k.startswith("rank_utilization/") and k not in CONSOLE_KEYS]
            self.held.update({k: logs.pop(k) for k in detail})
            if detail and self.owner.latest:
                lowest = min(self.owner.latest, key=lambda s: s.utilization)
                logs[LOWEST_KEY] = f"{lowest.name} ({lowest.utilization:.3g})"
