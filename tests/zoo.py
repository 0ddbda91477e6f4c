"""The model zoo matrix: every architecture peft has default LoRA targets for × every head transformers has.

A *cell* is one (model type, task) pair: the transformers class for the task is looked up in transformers'
``MODEL_FOR_*_MAPPING_NAMES`` and built tiny from its config (``tiny_config``). :func:`run_cell` trains one
method (LoRA, DoRA, QLoRA) on a cell one optimizer step next to plain peft on the same weights, saves it, and
reloads it through hf_lorax; :func:`peft_reload` then reloads every saved cell of a test file in ONE
subprocess that never imports hf_lorax (``tests/scripts/peft_reload.py``).

The cell list is generated, not written by hand: :func:`all_cells` is every pair transformers has, and the
groups below only say which test file runs it (``test_every_buildable_cell_is_in_a_group`` checks that none
is left out). Cells that plain peft itself cannot handle are in :data:`PEFT_FAILS` with the reason; their
tests are strict xfails, so the day peft handles them the test says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from transformers.models.auto import configuration_auto, modeling_auto
from transformers.pytorch_utils import Conv1D
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
                "step runs before the architecture default is applied): NoMatchingPeftModuleError")
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


# -- the subprocess reload by plain peft -----------------------------------------------------------------


def peft_reload(entries: list[dict], workdir: Path) -> dict[str, dict]:
    """Reload every saved cell with plain peft in one subprocess that never imports hf_lorax."""
    manifest = workdir / "manifest.json"
    manifest.write_text(json.dumps(entries))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).parent / "scripts" / "peft_reload.py"
    proc = subprocess.run([sys.executable, str(script), str(manifest)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"plain-peft reload process failed:\n{proc.stderr[-4000:]}")
    return json.loads((workdir / "results.json").read_text())


def randomize_adapters(model, seed: int = 0, scale: float = 0.5) -> None:
    """Non-trivial adapter weights (``lora_B`` starts at zero), large enough to move the outputs by >> TOL."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=gen) * scale
                p.copy_(p * (1 + noise) if "magnitude" in name else noise)


@contextlib.contextmanager
def zeroed_lora_b(model):
    """Every ``lora_B`` weight zeroed inside the block (restored after): the model without its adapter's effect."""
    saved = [(p, p.detach().clone()) for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p, _ in saved:
            p.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


# -- one cell -------------------------------------------------------------------------------------------


class PeftReferenceError(Exception):
    """Plain peft itself failed on the cell (the matrix marks such cells xfail, with the reason)."""


def load_base(cell: Cell, base_dir: Path, quantization_config=None, dtype=torch.float32) -> torch.nn.Module:
    model_class = getattr(transformers, cell.class_name)
    if quantization_config is None:
        return no_dropout(model_class.from_pretrained(base_dir, dtype=dtype))
    return no_dropout(model_class.from_pretrained(base_dir, quantization_config=quantization_config,
                                                  dtype=torch.float32))


def dequantized_copy(cell: Cell, base_dir: Path, out_dir: Path, quantization_config) -> Path:
    """Save the dense model whose weights are exactly the 4-bit base's weights, dequantized (QLORA_REFERENCE)."""
    import bitsandbytes as bnb

    quantized, dense = load_base(cell, base_dir, quantization_config), load_base(cell, base_dir)
    n = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                layer = dense.get_submodule(name)
                layer.weight.copy_(weight.t() if isinstance(layer, Conv1D) else weight)  # Conv1D stores (in, out)
                n += 1
    assert n, f"{cell.class_name} has no 4-bit layer after quantization"
    dense.save_pretrained(out_dir)
    return out_dir


def hf_config(cell: Cell, method: str, targets, rank_map, base_dir: Path):
    from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig

    kwargs = dict(task_type=cell.task, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, rank_map=rank_map,
                  base_model_name_or_path=str(base_dir))
    if cell.task in ("SEQ_CLS", "TOKEN_CLS"):
        kwargs["num_labels"] = NUM_LABELS
    if method == "qlora":
        return QLoRAConfig(compute_dtype="float32", **kwargs)
    return (DoRAConfig if method == "dora" else LoRAConfig)(**kwargs)


def peft_equivalent(config, heads):
    """The plain ``peft.LoraConfig`` that builds the same adapter as the hf_lorax ``config``."""
    from peft import LoraConfig

    return LoraConfig(task_type=config.task_type, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=config.target_modules, rank_pattern=dict(config.rank_map or {}),
                      use_dora=config.use_dora, modules_to_save=list(heads) or None)


def train_step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One SGD step in train mode (no dropout anywhere): the loss and every trainable parameter's gradient.

    SGD, not Adam: Adam moves a parameter whose gradient is float noise by a full ``lr``, so two equal models
    would part after one step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    # no gradient at all: a layer the forward does not reach (BART's causal LM has cross-attention, no encoder)
    grads = {n: torch.zeros(0) if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach(), grads


def head_names(model) -> set[str]:
    """Modules wrapped to train in full (``ModulesToSaveWrapper``), as names in the base model."""
    from peft.utils import ModulesToSaveWrapper

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def run_cell(cell: Cell, method: str, workdir: Path) -> dict:
    """Train, compare with plain peft, save and reload one cell; returns what the plain-peft reload process needs.

    Raises AssertionError when hf_lorax disagrees, PeftReferenceError when plain peft itself fails.
    """
    import pytest
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from hf_lorax import get_model
    from hf_lorax.logits_free import LogitsFreeCausalLM, logits_free_unsupported_reason
    from hf_lorax.plan import find_task_heads, resolve
    from hf_lorax.task_types import HEAD_TASK_TYPES

    folder = workdir / f"{cell.id}-{method}"
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    build_base(cell, wide=method == "qlora").save_pretrained(base_dir)
    probe_config = hf_config(cell, "lora", None, None, base_dir)
    bnb = hf_config(cell, method, None, None, base_dir).bnb_config() if method == "qlora" else None
    # LoRA and DoRA run in float64: tiny random networks amplify float32 rounding past TOL, float64 rounding not
    dtype = torch.float32 if bnb else torch.float64
    fresh = lambda: load_base(cell, base_dir, bnb, dtype)  # noqa: E731
    # the reference's base: the same weights, dense (for QLoRA: the 4-bit weights dequantized, see QLORA_REFERENCE)
    refused = (cell.model_type, cell.task, method) in HF_LORAX_REFUSES
    ref_dir = dequantized_copy(cell, base_dir, folder / "ref_base", bnb) if bnb and not refused else base_dir
    probe = fresh()
    targets = default_targets(cell, probe)
    probe_config = hf_config(cell, "lora", targets, None, base_dir)
    first = next(iter(resolve(probe_config, probe).modules))
    config = hf_config(cell, method, targets, {first: 6}, base_dir)
    batch, inputs = make_batch(cell), eval_inputs(cell, make_batch(cell))
    refusal = HF_LORAX_REFUSES.get((cell.model_type, cell.task, method))
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal[0]):
            get_model(config, model=fresh())
        return {"id": f"{cell.id}-{method}", "refused": refusal[1]}

    model = get_model(config, model=fresh())
    randomize_adapters(model)
    heads = set(find_task_heads(probe)) if cell.task in HEAD_TASK_TYPES else set()
    assert head_names(model) == heads, f"trained in full: {sorted(head_names(model))}, task head {sorted(heads)}"
    assert model.get_submodule(f"base_model.model.{first}").r["default"] == 6, "rank_map not applied"
    free = isinstance(model.get_base_model(), LogitsFreeCausalLM)
    reason = logits_free_unsupported_reason(probe) if cell.task == "CAUSAL_LM" else "not a causal LM"
    assert free == (reason is None), f"logits-free loss on: {free}; unsupported reason: {reason}"

    try:
        ref = get_peft_model(load_base(cell, ref_dir, dtype=dtype), peft_equivalent(config, heads))
        loaded = set_peft_model_state_dict(ref, get_peft_model_state_dict(model))
        assert not loaded.unexpected_keys, loaded.unexpected_keys
        ref_loss, ref_grads = train_step(ref, batch)
        ref_out = outputs(ref, inputs)
    except Exception as exc:
        raise PeftReferenceError(f"plain peft failed on {cell.id}/{method}: {exc!r}") from exc

    loss, grads = train_step(model, batch)  # logits-free where supported: checked against transformers' own
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-5, atol=1e-6)  # transformers: float32 CE
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item() if ref_grads[name].numel() else 0.0
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-4 * scale + 1e-7,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    out = outputs(model, inputs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=TOL)
    with zeroed_lora_b(model):
        effect = (out - outputs(model, inputs)).abs().max().item()
    assert effect > EFFECT, f"the adapter moves the outputs by only {effect:.2e}"

    model.save_pretrained(adapter_dir)
    again = get_model(str(adapter_dir), model=fresh())
    torch.testing.assert_close(outputs(again, inputs), out, rtol=0, atol=TOL)
    torch.save({"inputs": inputs, "expected": out}, folder / "io.pt")
    return {"id": f"{cell.id}-{method}", "class_name": cell.class_name, "base": str(ref_dir),
            "adapter": str(adapter_dir), "io": str(folder / "io.pt"), "tol": TOL, "dtype": str(dtype).split(".")[1],
            "logits_free": free, "logits_free_reason": reason}


# -- a test file's matrix ---------------------------------------------------------------------------------


def cases(group: str, methods: tuple[str, ...]) -> list:
    """pytest params ``(cell, method)`` of a group; the cells plain peft fails on are strict xfails."""
    import pytest

    params = []
    for cell in (all_cells() if group == "all" else group_cells(group)):
        for method in methods:
            if method == "qlora" and cell.task != "CAUSAL_LM":
                continue
            reason = peft_fail_reason(cell, method)
            marks = [pytest.mark.xfail(reason=reason, raises=PeftReferenceError, strict=True)] if reason else []
            params.append(pytest.param(cell, method, id=f"{cell.id}-{method}", marks=marks))
    return params


def run_matrix(params: list, workdir: Path) -> dict:
    """Run every case in-process, then reload all saved ones with plain peft in one subprocess."""
    results, entries = {}, []
    for param in params:
        cell, method = param.values
        key = f"{cell.id}-{method}"
        try:
            entry = run_cell(cell, method, workdir)
        except Exception as exc:  # re-raised by the cell's own test
            results[key] = exc
            continue
        if "refused" not in entry:
            entries.append(entry)
        results[key] = entry
    reloaded = peft_reload(entries, workdir) if entries else {}
    for entry in entries:
        entry["peft"] = reloaded.get(entry["id"], {"error": "not reported"})
    results["_hf_lorax_imported"] = reloaded.get("_hf_lorax_imported", False)
    return results


def check_case(results: dict, cell: Cell, method: str) -> None:
    result = results[f"{cell.id}-{method}"]
    if isinstance(result, Exception):
        raise result
    if "refused" in result:
        return  # run_cell asserted hf_lorax's error
    assert not results["_hf_lorax_imported"], "the plain-peft reload process imported hf_lorax"
    peft = result["peft"]
    assert "error" not in peft, f"plain peft could not reload the saved adapter: {peft['error']}"
    assert peft["max_diff"] <= TOL, f"plain peft's reload differs by {peft['max_diff']:.2e}"
