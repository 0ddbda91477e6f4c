"""``RankUtilizationCallback``: measure how much of each adapter's rank training really uses."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ..adapter_files import write_json
from .plots import plot_rank_utilization
from .report import (
    ModuleStats,
    analyze,
    per_module_metrics,
    stats_to_dict,
    suggest_rank_map,
    summarize,
    updates_from_model,
)

JSON_NAME = "rank_utilization.json"
PNG_NAME = "rank_utilization.png"
SUGGESTION_NAME = "suggested_rank_map.json"


class RankUtilizationCallback(TrainerCallback):
    """Log rank utilization through the Trainer's loggers and write a report at the end of training.

    Every ``every_n_steps`` optimizer steps (main process only) the singular values of each adapter's
    ``ΔW = s·BA`` are computed from the factors (an r×r SVD per module), and a summary is logged through
    ``Trainer.log`` — so ``trainer.state.log_history``, and with :meth:`attach` TensorBoard, W&B and every
    other configured reporter, receive it: ``rank_utilization/mean``, ``/min``, per module type
    (``rank_utilization/type/query/mean``) and per layer (``rank_utilization/layer/3/mean``), plus every
    module when ``log_per_module``. At the end of training it writes, into ``output_dir`` (default: the
    run's ``args.output_dir``): ``rank_utilization.json`` (history and final per-module statistics),
    ``rank_utilization.png`` and ``suggested_rank_map.json``, which ``LoRAConfig(rank_map=path)`` accepts.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        RankUtilizationCallback(every_n_steps=100).attach(trainer)  # first, so the reporters see its metrics
    """

    def __init__(self, every_n_steps: int = 100, output_dir: str | None = None, log_per_module: bool = True,
                 threshold: float = 0.9, plot: bool = True):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer.")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in (0, 1].")
        self.every_n_steps, self.output_dir, self.log_per_module = every_n_steps, output_dir, log_per_module
        self.threshold, self.plot = threshold, plot
        self.history: list[dict] = []
        self.latest: list[ModuleStats] = []
        self._pending: dict[str, float] = {}

    def measure(self, model, step: int) -> dict[str, float]:
        self.latest = analyze(updates_from_model(model))
        summary = summarize(self.latest)
        self.history.append({"step": step, "summary": summary})
        metrics = dict(summary)
        if self.log_per_module:
            metrics.update(per_module_metrics(self.latest))
        return metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            # every rank logs at this step: Trainer's logging gathers the loss across processes
            control.should_log = True
            if state.is_world_process_zero and model is not None:
                self._pending = self.measure(model, state.global_step)
        return control

    def attach(self, trainer) -> RankUtilizationCallback:
        """Put this callback first in ``trainer``'s callbacks (that trainer only), so that the reporters after
        it (TensorBoard, W&B, ...) receive its metrics too; returns the callback.

        ``Trainer(callbacks=[...])`` places user callbacks after the reporters, and a callback can only add
        metrics to the ``logs`` of a ``Trainer.log`` call the callbacks after it see.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the pending metrics to this ``Trainer.log`` call: its ``logs`` (what the callbacks after this one
        receive) and the ``log_history`` entry the Trainer appended just before."""
        if self._pending and logs is not None:
            pending, self._pending = self._pending, {}
            logs.update(pending)
            if state.log_history:
                state.log_history[-1].update(pending)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return control
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.measure(model, state.global_step)
        self.write(self.output_dir or args.output_dir, step=state.global_step)
        return control

    def write(self, directory: str, step: int | None = None) -> dict[str, str]:
        """Write the JSON report, the plot and the suggested rank map; returns their paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {"json": os.path.join(directory, JSON_NAME), "suggestion": os.path.join(directory, SUGGESTION_NAME)}
        report = {"every_n_steps": self.every_n_steps, "threshold": self.threshold, "history": self.history,
                  "modules": stats_to_dict(self.latest)}
        suggestion = {"rank_map": suggest_rank_map(self.latest, self.threshold), "threshold": self.threshold,
                      "step": step}
        write_json(paths["json"], report)
        write_json(paths["suggestion"], suggestion)
        if self.plot and self.latest:
            paths["png"] = plot_rank_utilization(self.latest, self.history, os.path.join(directory, PNG_NAME),
                                                 title=f"rank utilization at step {step}")
        return paths

