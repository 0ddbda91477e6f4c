"""An embedded sentence-classification task and a tiny RoBERTa, for the demo and tests (no download).

Sentences mix neutral filler with sentiment words; ``not`` flips the word after it; the label is the
sign of the summed polarity (1 = positive).

:func:`pretrain_tiny_roberta` plays the part of pre-training: it fully fine-tunes a tiny RoBERTa on the
task *without* negations, so the base knows word polarity but not ``not``. Adapting it to the task with
negations is then a small but real fine-tuning problem (a randomly initialised base cannot be adapted
meaningfully with low-rank updates alone).
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

POSITIVE = "good great excellent wonderful delightful superb pleasant brilliant lovely charming".split()
NEGATIVE = "bad awful terrible poor dreadful horrible boring weak mediocre ugly".split()
FILLER = (
    "the a movie film plot story actor actress scene music ending script cast was is and with of this that "
    "really quite very rather somewhat overall director camera dialogue pacing"
).split()
NEGATOR = "not"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's order: pad id 1


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level RoBERTa-style tokenizer over the task's vocabulary."""
    words = SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER + [NEGATOR]))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=64,
    )


def tiny_roberta_config(vocab_size: int, num_labels: int = 2, layers: int = 4, hidden: int = 64) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=72, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, num_labels=num_labels, type_vocab_size=1,
    )


def build_tiny_roberta(num_labels: int = 2, seed: int = 0, **kwargs) -> tuple[RobertaForSequenceClassification, PreTrainedTokenizerFast]:
    """A randomly initialised RoBERTa-shaped classifier and its tokenizer (seeded)."""
    import torch

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(tiny_roberta_config(len(tokenizer), num_labels, **kwargs))
    return model, tokenizer


def make_sentence(rng: random.Random, negation_rate: float = 0.3) -> tuple[str, int]:
    words, polarity = [], 0
    n_sentiment = rng.choice([1, 3, 5])  # odd: never a tie
    slots = sorted(rng.sample(range(12), n_sentiment))
    for i in range(12):
        if i in slots:
            positive = rng.random() < 0.5
            if rng.random() < negation_rate:
                words.append(NEGATOR)
                polarity += -1 if positive else 1
            else:
                polarity += 1 if positive else -1
            words.append(rng.choice(POSITIVE if positive else NEGATIVE))
        elif rng.random() < 0.6:
            words.append(rng.choice(FILLER))
    return " ".join(words), int(polarity > 0)


def make_sentiment_splits(
    n_train: int = 2000, n_eval: int = 400, seed: int = 0, negation_rate: float = 0.3
) -> dict[str, dict[str, list]]:
    """``{"train": {"sentence": [...], "label": [...]}, "validation": {...}}``, deterministic for a seed."""
    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = [make_sentence(rng, negation_rate) for _ in range(n)]
        splits[split] = {"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}
    return splits


def pretrain_tiny_roberta(output_dir: str, seed: int = 0, n_train: int = 4000, epochs: float = 3) -> str:
    """Train a tiny RoBERTa on negation-free sentences (full fine-tuning) and save it with its tokenizer.

    Returns ``output_dir``. Reuses a model already saved there.
    """
    import os

    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    set_seed(seed)
    model, tokenizer = build_tiny_roberta(seed=seed)
    data = make_sentiment_splits(n_train=n_train, n_eval=0, seed=seed + 1000, negation_rate=0.0)["train"]
    train = Dataset.from_dict(data).map(lambda b: tokenizer(b["sentence"]), batched=True, remove_columns=["sentence"])
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "_pretraining"), num_train_epochs=epochs, learning_rate=1e-3,
        per_device_train_batch_size=32, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def write_sst2_folder(folder: str, seed: int = 0, n_train: int = 3000, n_eval: int = 500) -> str:
    """Write the task as ``train.tsv`` / ``dev.tsv`` in GLUE's SST-2 layout (``sentence<TAB>label``)."""
    import os

    os.makedirs(folder, exist_ok=True)
    splits = make_sentiment_splits(n_train=n_train, n_eval=n_eval, seed=seed)
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = zip(splits[split]["sentence"], splits[split]["label"])
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return folder
