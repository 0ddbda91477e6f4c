"""The model zoo matrix: every architecture peft has default LoRA targets for × every head transformers has.

A *cell* is one (model type, task) pair: the transformers class for the task is looked up in transformers'
``MODEL_FOR_*_MAPPING_NAMES`` and built tiny from its config (``tiny_config``). ``tests/zoo_run.py`` runs the
cells (one optimizer step next to plain peft, save, reload through hf_lorax and through plain peft in one
subprocess per test class); ``python tests/zoo.py`` prints the README's table of tested cells.

The cell list is generated, not written by hand: :func:`all_cells` is every pair transformers has, and the
groups below only say which test file runs it (``test_every_buildable_cell_is_in_a_group`` checks that none
is left out). Cells that plain peft itself cannot handle are in :data:`PEFT_FAILS` with the reason; their
tests are strict xfails, so the day peft handles them the test says so.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import transformers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers.models.auto import configuration_auto, modeling_auto
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

TASK_MAPPINGS = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
VOCAB, BATCH, SEQ, NUM_LABELS = 64, 2, 8, 3
PAD, BOS, EOS = 0, 1, 2
TOL = 1e-4  # eval outputs after a save/reload round trip
# QLoRA runs in float32 (bitsandbytes has no float64 4-bit path). One SGD step (lr 0.1) turns the gradients' float32
# rounding (~1e-5 relative, BLAS-dependent) into logit differences of a tiny random network of up to 1.3e-3 (Bloom,
# measured on an AMD EPYC CPU; below 1e-4 on an Intel one). Before the step the outputs agree to TOL.
FLOAT32_STEP_TOL = 3e-3
EFFECT = 5e-3  # the adapter must move the outputs by at least this much (50x TOL)

# Sizes every config gets where it has the field (hidden 32, 2 layers, 4 heads, tiny vocab).
SIZE = dict(
    vocab_size=VOCAB, hidden_size=32, d_model=32, n_embd=32, embedding_size=32, num_hidden_layers=2, n_layer=2,
    num_layers=2, n_layers=2, num_decoder_layers=2, encoder_layers=2, decoder_layers=2, num_attention_heads=4,
    n_head=4, n_heads=4, encoder_attention_heads=4, decoder_attention_heads=4, num_heads=4, num_key_value_heads=2,
    intermediate_size=64, ffn_dim=64, d_ff=64, n_inner=64, encoder_ffn_dim=64, decoder_ffn_dim=64, d_kv=8,
    head_dim=8, rotary_dim=8, max_position_embeddings=64, n_positions=64, max_seq_len=64, context_length=64,
    max_2d_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=PAD,
    tie_word_embeddings=False, initializer_range=0.2, init_std=0.2,
)
# QLoRA cells: bitsandbytes' CPU 4-bit matmul packs weights in blocks of 64 inputs, so no layer narrower than that.
WIDE = dict(hidden_size=64, d_model=64, n_embd=64, embedding_size=64, intermediate_size=128, ffn_dim=128, d_ff=128,
            n_inner=128, encoder_ffn_dim=128, decoder_ffn_dim=128, d_kv=16, head_dim=16, rotary_dim=16,
            intermediate_size_mlp=128, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
            attention_hidden_size=64, mamba_head_dim=16)
# The QLoRA reference is plain peft on the dense base whose weights are the 4-bit weights dequantized, not plain
# peft on the 4-bit base: on CPU, bitsandbytes' 4-bit inference path differs from its own dequantized weights by
# up to ~0.1 in these tiny models' logits, while hf_lorax's 4-bit layers match the dequantized math to float
# precision. What QLoRA adds (the quantization) is bitsandbytes' business; what is tested is the adapter.
QLORA_REFERENCE = "plain peft on the dequantized base"
# Cells hf_lorax refuses with a clear error (match, reason); the test asserts the error.
HF_LORAX_REFUSES = {
    ("falcon", "CAUSAL_LM", "qlora"): ("no bitsandbytes-quantized linear layers",
                                       "transformers quantizes none of Falcon's FalconLinear projections"),
}
# Fields some architectures need besides SIZE.
EXTRA = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "bert": dict(is_decoder=True), "roberta": dict(is_decoder=True), "xlm-roberta": dict(is_decoder=True),
    "electra": dict(is_decoder=True),
    "llama4": dict(intermediate_size_mlp=64, num_local_experts=2, moe_layers=[1], no_rope_layers=[1, 1],
                   attention_chunk_size=64),
    "nemotron_h": dict(layers_block_type=["mamba", "attention"], mamba_num_heads=4, mamba_head_dim=8,
                       ssm_state_size=8, n_groups=1, chunk_size=8, n_routed_experts=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=32, num_experts_per_tok=1),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
    "rwkv": dict(attention_hidden_size=32, rescale_every=0),  # transformers' eval-time rescale breaks 4-bit RWKV
    "mt5": dict(initializer_factor=0.3),
}
# Model types whose layers have no float64 CPU kernel (Mixtral's experts use a grouped GEMM): run in float32.
FLOAT32_ONLY = frozenset({"mixtral"})
# Which test file runs which model types (loadfile spreads the files over the xdist workers).
GROUPS = {
    "encoders": ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "layoutlm"),
    "seq2seq": ("t5", "mt5", "bart"),
    "decoders_a": ("gpt2", "bloom", "opt", "gptj", "gpt_neox", "gpt_neo", "llama", "llama4", "gpt_bigcode",
                   "mpt", "falcon", "codegen"),
    "decoders_b": ("mistral", "mixtral", "stablelm", "phi", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
                   "nemotron_h", "rwkv"),
}
# Model types in peft's table that transformers has no class for here, or none we can build tiny (why).
NOT_BUILT = {
    "blip-2": "no SEQ_CLS/TOKEN_CLS/QA/causal/seq2seq head class (vision-to-text only)",
    "gemma4": "its CAUSAL_LM class is the multimodal Gemma4ForConditionalGeneration (vision and audio towers)",
}
# (model type, task, method) cells plain peft itself fails on, with the reason (method None: every method).
_MOE_DEFAULT = ("peft 0.21.2 turns target_modules=None into an empty set for Mixtral (its MoE weight-conversion "
                "step runs before the architecture default is applied): NoMatchingPeftModuleError. With explicit "
                "target_modules, Mixtral's SEQ_CLS and CAUSAL_LM cells pass against plain peft (tests/test_heads.py)")
PEFT_FAILS: dict[tuple[str, str, str | None], str] = {
    ("mixtral", task, None): _MOE_DEFAULT for task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM")
}


@dataclasses.dataclass(frozen=True)
class Cell:
    model_type: str
    task: str
    class_name: str

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.task}"


def all_cells() -> list[Cell]:
    """Every (peft model type, head task) transformers has a class for, in peft's table order."""
    cells = []
    for model_type in PEFT_TARGETS:
        if model_type not in configuration_auto.CONFIG_MAPPING_NAMES or model_type in NOT_BUILT:
            continue
        for task, mapping in TASK_MAPPINGS.items():
            name = getattr(modeling_auto, mapping).get(model_type)
            if name and hasattr(transformers, name):
                cells.append(Cell(model_type, task, name))
    return cells


def group_cells(group: str) -> list[Cell]:
    return [c for c in all_cells() if c.model_type in GROUPS[group]]


def peft_fail_reason(cell: Cell, method: str) -> str | None:
    return PEFT_FAILS.get((cell.model_type, cell.task, method)) or PEFT_FAILS.get((cell.model_type, cell.task, None))


# -- building -------------------------------------------------------------------------------------------


def tiny_config(cell: Cell, wide: bool = False):
    model_class = getattr(transformers, cell.class_name)
    config_class = model_class.config_class
    params = set(inspect.signature(config_class.__init__).parameters)
    wanted = {**SIZE, **EXTRA.get(cell.model_type, {}), **(WIDE if wide else {})}
    config = config_class(**{k: v for k, v in wanted.items() if k in params})
    for key, value in config.to_dict().items():  # no dropout anywhere: train-mode forwards are deterministic
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key.endswith("_drop")):
            setattr(config, key, 0.0)
    config.decoder_start_token_id = PAD  # T5's classification heads read it even though __init__ has no field
    config.num_labels = 2 if cell.task == "QUESTION_ANS" else NUM_LABELS  # QA heads split into start/end logits
    return config


def build_base(cell: Cell, seed: int = 0, wide: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return no_dropout(getattr(transformers, cell.class_name)(tiny_config(cell, wide)))


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere (some heads pick a fixed 0.1 when the config names none): train mode is exact."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def make_batch(cell: Cell, seed: int = 1) -> dict:
    """Inputs with labels for the cell's task (every row ends with EOS: BART/T5 classifiers pool on it)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    ids[:, -1] = EOS
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cell.task == "SEQ_CLS":
        batch["labels"] = torch.randint(0, NUM_LABELS, (BATCH,), generator=gen)
    elif cell.task == "TOKEN_CLS":
        batch["labels"] = torch.randint(0, NUM_LABELS, (BATCH, SEQ), generator=gen)
    elif cell.task == "QUESTION_ANS":
        batch["start_positions"] = torch.randint(0, SEQ, (BATCH,), generator=gen)
        batch["end_positions"] = torch.randint(0, SEQ, (BATCH,), generator=gen)
    elif cell.task == "CAUSAL_LM":
        labels = ids.clone()
        labels[:, :2] = -100
        batch["labels"] = labels
    elif cell.task == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(3, VOCAB, (BATCH, 5), generator=gen)
    if cell.model_type == "rwkv":
        batch.pop("attention_mask")  # RWKV has no attention mask
    return batch


def eval_inputs(cell: Cell, batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    if cell.task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = batch["labels"]
    return inputs


def outputs(model, inputs: dict) -> torch.Tensor:
    """Every logits tensor of the model's eval output, flattened into one float64 vector."""
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    parts = [out[k] for k in ("logits", "start_logits", "end_logits") if out.get(k) is not None]
    return torch.cat([p.double().reshape(-1) for p in parts])


def default_targets(cell: Cell, model) -> list[str] | None:
    """None (peft's default for the architecture) where peft's table has the model's own ``model_type``."""
    if model.config.model_type in PEFT_TARGETS:
        return None
    return list(PEFT_TARGETS[cell.model_type])  # e.g. llama4's text model is "llama4_text"


# -- the README's table ------------------------------------------------------------------------------------

COLUMNS = {"SEQ_CLS": "SEQ_CLS", "TOKEN_CLS": "TOKEN_CLS", "QUESTION_ANS": "QA", "CAUSAL_LM": "CAUSAL_LM",
           "SEQ_2_SEQ_LM": "SEQ_2_SEQ_LM"}


def readme_table() -> str:
    """The README's table of tested cells, generated from the cell list (tests/test_heads.py keeps it current)."""
    from hf_lorax.loss import logits_free_unsupported_reason

    notes: dict[str, int] = {}

    def note(text: str) -> str:
        return f"[{notes.setdefault(text, len(notes) + 1)}]"

    rows: dict[str, dict[str, str]] = {}
    for cell in all_cells():
        methods = ["LoRA", "DoRA"] + (["QLoRA"] if cell.task == "CAUSAL_LM" else [])
        parts = []
        for method in methods:
            reason = peft_fail_reason(cell, method.lower())
            refused = HF_LORAX_REFUSES.get((cell.model_type, cell.task, method.lower()))
            parts.append(method + (f" xfail{note('plain peft fails: ' + reason)}" if reason else "")
                         + (f" refused{note('hf_lorax refuses with a clear error: ' + refused[1])}" if refused else ""))
        text = ", ".join(parts)
        if cell.task == "CAUSAL_LM":
            why = logits_free_unsupported_reason(build_base(cell))
            text += "; logits-free" if why is None else f"; own loss{note('stock loss: ' + why)}"
        rows.setdefault(cell.model_type, {})[cell.task] = text
    lines = ["| model_type | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {mt} | " + " | ".join(tasks.get(t, "") for t in COLUMNS) + " |" for mt, tasks in rows.items()]
    lines += ["", *(f"[{n}] {text}" for text, n in notes.items())]
    lines += ["", "Not in the matrix: " + "; ".join(f"`{mt}`: {why}" for mt, why in NOT_BUILT.items())
              + "; peft's other entries (" + ", ".join(f"`{mt}`" for mt in PEFT_TARGETS
                                                      if mt not in configuration_auto.CONFIG_MAPPING_NAMES)
              + ") have no transformers class."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
