"""One SST-2 training epoch: hf_lorax's GLUE runner vs the transformers ``run_glue.py``-style recipe.

Both train the same RoBERTa-shaped model (random init; no weights are downloaded) on the same SST-2
sentences with LoRA r=8 on query/value, batch 16, one epoch, in one process run:

* baseline: ``Trainer`` + peft ``LoraConfig``, every example padded to ``max_length=128`` (as
  ``run_glue.py --pad_to_max_length``), default sampler;
* hf_lorax: :func:`hf_lorax_paper.tasks.glue.run` — dynamic padding, length-grouped batches, rank-utilization
  callback on.

The tokenizer is a word-level one built from the training sentences (no Hub access), so token counts are
close to, but not exactly, RoBERTa's BPE. Prints a table and JSON with ``train_runtime`` of both and their
ratio (target ≤ 0.5).

    python scripts/bench_glue.py [--data_dir ../shared/data/glue] [--train_samples 4000] [--json out.json]
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import os
import tempfile
import time
from collections import Counter

from bench_utils import emit, parse_checked

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_assets(data_dir: str | None, n: int, workdir: str, layers: int, hidden: int):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    from hf_lorax_paper.tasks.glue_data import get_task, load_local
    from hf_lorax_paper.tasks.synthetic import write_sst2_folder

    if not data_dir or not os.path.isdir(os.path.join(data_dir, "SST-2")):
        data_dir = os.path.dirname(write_sst2_folder(os.path.join(workdir, "SST-2"), n_train=n, n_eval=500))
    splits = load_local(data_dir, get_task("sst2"), max_train=n, max_eval=872)
    counts = Counter(w for s in splits["train"]["sentence"] for w in s.split())
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w, _ in counts.most_common(20000)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", mask_token="<mask>", model_max_length=512)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=514, num_labels=2, pad_token_id=1))
    base = os.path.join(workdir, "base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return data_dir, base, splits


def baseline(base: str, splits: dict, out: str, batch: int, threads: int) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base),
                           LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"]))
    encode = lambda b: tokenizer(b["sentence"], padding="max_length", max_length=128, truncation=True)  # noqa: E731
    train = Dataset.from_dict(splits["train"]).map(encode, batched=True, remove_columns=["sentence"])
    dev = Dataset.from_dict(splits["validation"]).map(encode, batched=True, remove_columns=["sentence"])
    args = TrainingArguments(output_dir=out, num_train_epochs=1, per_device_train_batch_size=batch,
                             per_device_eval_batch_size=64, learning_rate=5e-4, warmup_steps=0.06, report_to=[],
                             save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())})
    train_runtime = trainer.train().metrics["train_runtime"]
    start = time.perf_counter()
    accuracy = trainer.evaluate()["eval_accuracy"]
    return {"train_runtime_s": train_runtime, "eval_runtime_s": time.perf_counter() - start, "accuracy": accuracy,
            "tokens_per_example": 128.0}


def ours(base: str, data_dir: str, out: str, n: int, batch: int, threads: int) -> dict:
    import torch

    from hf_lorax_paper.experiment import parse, run
    from hf_lorax_paper.tasks.glue import GluePlugin

    torch.set_num_threads(threads)
    argv = ["--task", "sst2", "--model_name_or_path", base, "--data_dir", data_dir, "--output_dir", out,
            "--num_train_epochs", "1", "--per_device_train_batch_size", str(batch), "--max_length", "128",
            "--learning_rate", "5e-4", "--max_train_samples", str(n), "--max_eval_samples", "872", "--use_cpu", "true",
            "--disable_tqdm", "true", "--logging_steps", str(10**6), "--report_to", "none"]
    results = run(GluePlugin(), parse(GluePlugin(), argv))
    return {"train_runtime_s": results["timings_s"]["train"], "accuracy": results["main_metric"]["value"]}


def main(argv=None) -> dict:
    from hf_lorax.cli import OneLineArgumentParser
    from hf_lorax_paper.arguments import WHOLE_POSITIVE

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    default_data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    parser.add_argument("--data_dir", default=default_data)
    parser.add_argument("--train_samples", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parse_checked(parser, argv, dict.fromkeys(("train_samples", "batch_size", "layers", "hidden", "threads"),
                                                   WHOLE_POSITIVE))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, base, splits = build_assets(args.data_dir, args.train_samples, tmp, args.layers, args.hidden)
        real = os.path.abspath(data_dir) == os.path.abspath(args.data_dir)
        rows = {"baseline": baseline(base, splits, os.path.join(tmp, "baseline"), args.batch_size, args.threads),
                "hf_lorax": ours(base, data_dir, os.path.join(tmp, "ours"), args.train_samples, args.batch_size,
                                 args.threads)}
    ratio = rows["hf_lorax"]["train_runtime_s"] / rows["baseline"]["train_runtime_s"]
    result = {"data": "GLUE SST-2 (../shared/data/glue)" if real else "embedded SST-2-shaped task",
              "train_examples": args.train_samples, "model": f"RoBERTa-shaped {args.layers}x{args.hidden}",
              "batch_size": args.batch_size, "threads": args.threads, "rows": rows, "epoch_time_ratio": ratio}
    print(f"\n{'recipe':<10} {'epoch s':>9} {'accuracy':>9}")
    for name, row in rows.items():
        print(f"{name:<10} {row['train_runtime_s']:9.1f} {row['accuracy']:9.3f}")
    print(f"hf_lorax / baseline epoch time: {ratio:.3f} (target <= 0.5)")
    return emit(result, args.json)


if __name__ == "__main__":
    main()
