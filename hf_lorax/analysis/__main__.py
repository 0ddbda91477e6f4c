"""Rank utilization of a saved adapter: a table, the plot and a suggested rank map.

    python -m hf_lorax.analysis ADAPTER_DIR [--base_model DIR] [--output_dir DIR]

Prints per-module rank utilization of a saved adapter, writes ``rank_utilization.png``,
``rank_utilization.json`` and ``suggested_rank_map.json`` (into ``--output_dir``, default the adapter
folder, where a training run's files are kept unless ``--overwrite``).

``--budget N`` (LoRA parameters) or ``--budget_ratio 0.25`` (of the adapter's own LoRA parameters) makes
``suggested_rank_map.json`` a budgeted allocation (:mod:`hf_lorax.analysis.allocation`): ``rank_map``,
``alpha_map`` (``--alpha_policy``), ``params``. Without them it holds the ``--threshold`` energy suggestion.
``--signal sensitivity`` values directions by the loss sensitivity the training run's ``RankUtilizationCallback``
recorded in ``rank_utilization.json`` beside the adapter (``--signal energy``, the default, by update energy).
"""

from __future__ import annotations

import os
import sys

from ..adapter_files import read_adapter_folder, read_json, write_json
from ..cli import OneLineArgumentParser, debug_enabled
from .allocation import ALPHA_POLICIES, SIGNALS, allocate, budget_from_ratio, spectra_from_updates
from .callback import JSON_NAME, SUGGESTION_NAME, RankUtilizationCallback
from .report import analyze, updates_from_adapter_dir


def _base_weights(base_dir: str) -> dict:
    """``{module: (out, in) weight}`` of every 2-D ``.weight`` in a local model folder's safetensors files."""
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(f"--base_model {base_dir!r} is not a local model directory.")
    from safetensors.torch import load_file

    weights = {}
    files = [os.path.join(base_dir, name) for name in sorted(os.listdir(base_dir)) if name.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"--base_model {base_dir!r} holds no .safetensors weights.")
    for path in files:
        try:
            weights.update(load_file(path))
        except Exception as exc:  # safetensors raises its own SafetensorError for every kind of damage
            raise ValueError(f"{path} is truncated or corrupt ({exc}).") from exc
    from transformers import AutoConfig

    conv1d = AutoConfig.from_pretrained(base_dir).model_type in {"gpt2"}  # Conv1D stores (in, out)
    return {key.removesuffix(".weight"): value.T if conv1d and not key.endswith(("wte.weight", "wpe.weight")) else value
            for key, value in weights.items() if key.endswith(".weight") and value.ndim == 2}


def main(argv=None) -> int:
    """The command line; user errors are one ``error:`` line on stderr and exit code 2."""
    parser = OneLineArgumentParser(prog="python -m hf_lorax.analysis", description=__doc__.split("\n\n")[0],
                                   removed={"--against": "use hf_lorax.analysis.subspace_similarity from Python (README)"})
    parser.add_argument("adapter_dir")
    parser.add_argument("--base_model", help="local base model folder, for ‖ΔW‖/‖W‖")
    parser.add_argument("--output_dir", help="where to write the plot and JSON files (default: adapter_dir)")
    parser.add_argument("--threshold", type=float, default=0.9, help="energy kept by the suggested ranks, in (0, 1]")
    parser.add_argument("--overwrite", action="store_true", help="replace a training run's rank-utilization files")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, help="allocate ranks to at most N LoRA parameters")
    budget.add_argument("--budget_ratio", type=float, help="budget as a fraction of this adapter's LoRA parameters")
    parser.add_argument("--alpha_policy", default="scaling", choices=ALPHA_POLICIES,
                        help="lora_alpha of the allocated ranks: keep each module's scaling, keep alpha, or rsLoRA")
    parser.add_argument("--signal", default="energy", choices=SIGNALS,
                        help="value of a direction: its share of update energy, or its recorded loss sensitivity")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or args.adapter_dir
    try:
        if not 0 < args.threshold <= 1:
            raise ValueError(f"--threshold {args.threshold} must be in (0, 1].")
        if not os.path.isfile(os.path.join(args.adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(f"{args.adapter_dir!r} is not an adapter folder (no adapter_config.json).")
        if args.budget is not None or args.budget_ratio is not None:
            return _allocate(args)
        # the training callback's files hold the run's history, which this report (one point) would replace
        previous = os.path.join(args.output_dir, JSON_NAME)
        if not args.overwrite and os.path.isfile(previous) and read_json(previous).get("history"):
            raise FileExistsError(f"{previous} holds the training run's rank-utilization history, which this report "
                                  "would replace; pass --output_dir DIR (or --overwrite).")
        return _report(args)
    except (ValueError, OSError) as exc:
        if args.debug or debug_enabled():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _report(args) -> int:
    updates = updates_from_adapter_dir(args.adapter_dir, _base_weights(args.base_model) if args.base_model else None)
    report = RankUtilizationCallback(threshold=args.threshold)  # the training run's writer
    report.latest = analyze(updates)
    print(f"{'module':<48} {'r':>3} {'eff.rank':>8} {'util':>6} {'r90':>4} {'r99':>4} {'stable':>7} {'|dW|/|W|':>9}")
    for s in report.latest:
        rel = f"{s.relative_norm:.4f}" if s.relative_norm is not None else "-"
        print(f"{s.name:<48} {s.r:>3} {s.effective_rank:>8.2f} {s.utilization:>6.2f} {s.rank_90:>4} {s.rank_99:>4} "
              f"{s.stable_rank:>7.2f} {rel:>9}")
    paths = report.write(args.output_dir)
    print("\nwrote " + ", ".join(sorted(paths.values())))
    return 0


def _allocate(args) -> int:
    """``--budget`` / ``--budget_ratio``: write the budgeted ``suggested_rank_map.json``."""
    sensitivity = _recorded_sensitivity(args.adapter_dir) if args.signal == "sensitivity" else None
    spectra = spectra_from_updates(updates_from_adapter_dir(args.adapter_dir), sensitivity)
    budget = args.budget if args.budget is not None else budget_from_ratio(spectra, args.budget_ratio)
    lora_alpha = float(read_adapter_folder(args.adapter_dir).config.get("lora_alpha") or 8)
    plan = allocate(spectra, budget, lora_alpha=lora_alpha, alpha_policy=args.alpha_policy, signal=args.signal)
    for module, rank in plan.rank_map.items():
        print(f"{module:<56} r {rank:>3}" + (f"  alpha {plan.alpha_map[module]:g}" if plan.alpha_map else ""))
    os.makedirs(args.output_dir, exist_ok=True)
    path = write_json(os.path.join(args.output_dir, SUGGESTION_NAME), plan.to_json())
    print(f"\n{plan.params:,} LoRA parameters (budget {plan.budget:,}); wrote {path}")
    return 0


def _recorded_sensitivity(adapter_dir: str) -> dict[str, list[float]]:
    path = os.path.join(adapter_dir, JSON_NAME)
    recorded = read_json(path).get("sensitivity") if os.path.isfile(path) else None
    if not recorded:
        raise ValueError(f"--signal sensitivity: {path} holds no loss sensitivity; it is recorded by "
                         "RankUtilizationCallback during training into the run's output_dir (save the adapter there), "
                         "or use --signal energy.")
    return recorded["scores"]


if __name__ == "__main__":
    sys.exit(main())
