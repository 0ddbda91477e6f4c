"""peft task types and what they mean for loading and describing a model (one table, used everywhere)."""

from __future__ import annotations

# Auto class for each peft task type (None: the bare model).
AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "CAUSAL_LM": "AutoModelForCausalLM",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel", None: "AutoModel"}
# The Hub's pipeline tag for each task type.
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation",
                 "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering",
                 "SEQ_2_SEQ_LM": "text2text-generation", "FEATURE_EXTRACTION": "feature-extraction"}
# Task types whose head sits outside the transformer body and trains with the adapter.
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})
# Task types whose head is built with ``num_labels``.
LABELLED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "qdora": "QDoRA"}


def task_name(task_type) -> str | None:
    """The plain string of a peft ``TaskType`` (an enum or a string)."""
    return getattr(task_type, "value", task_type)
# Names peft's task classes append to ``modules_to_save`` themselves (``PeftModelForSequenceClassification``,
# ``PeftModelForTokenClassification``, ``PeftModelForQuestionAnswering``); tests/test_heads.py checks them.
PEFT_ADDED_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                    "QUESTION_ANS": ("qa_outputs",)}
