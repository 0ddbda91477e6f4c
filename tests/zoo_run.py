"""Running the zoo matrix (cells from tests/zoo.py): one method on one cell, and a test file's matrix.

:func:`run_cell` trains one method (LoRA, DoRA, QLoRA) on a cell one SGD step next to plain peft on the same
weights, checks the adapter's effect, saves it and reloads it through hf_lorax; :func:`run_matrix` then reloads
every saved cell of a test file in ONE subprocess that never imports hf_lorax (``tests/scripts/peft_reload.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from transformers.pytorch_utils import Conv1D
from zoo import (
    EFFECT,
    FLOAT32_ONLY,
    FLOAT32_STEP_TOL,
    HF_LORAX_REFUSES,
    NUM_LABELS,
    PEFT_TARGETS,
    TOL,
    Cell,
    all_cells,
    build_base,
    default_targets,
    eval_inputs,
    group_cells,
    make_batch,
    no_dropout,
    outputs,
    peft_fail_reason,
)

# -- the subprocess reload by plain peft -----------------------------------------------------------------


def peft_reload(entries: list[dict], workdir: Path) -> dict[str, dict]:
    """Reload every saved cell with plain peft in one subprocess that never imports hf_lorax."""
    manifest = workdir / "manifest.json"
    manifest.write_text(json.dumps(entries))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny models: one thread, as each test worker
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


def run_cell(cell: Cell, method: str, workdir: Path, explicit_targets: bool = False) -> dict:
    """Train, compare with plain peft, save and reload one cell; returns what the plain-peft reload process needs.

    Raises AssertionError when hf_lorax disagrees, PeftReferenceError when plain peft itself fails.
    """
    import pytest
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from hf_lorax import get_model
    from hf_lorax.loss import LogitsFreeCausalLM, logits_free_unsupported_reason
    from hf_lorax.plan import find_task_heads, resolve
    from hf_lorax.task_types import HEAD_TASK_TYPES

    folder = workdir / f"{cell.id}-{method}"
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    build_base(cell, wide=method == "qlora").save_pretrained(base_dir)
    probe_config = hf_config(cell, "lora", None, None, base_dir)
    bnb = hf_config(cell, method, None, None, base_dir).bnb_config() if method == "qlora" else None
    # LoRA and DoRA run in float64: tiny random networks amplify float32 rounding past TOL, float64 rounding not
    dtype = torch.float32 if bnb or cell.model_type in FLOAT32_ONLY else torch.float64
    if bnb:  # a 4-bit base is quantized as it loads
        fresh = lambda: load_base(cell, base_dir, bnb, dtype)  # noqa: E731
    else:  # a copy of the loaded base is that base loaded again (and 4x faster than loading it)
        base = load_base(cell, base_dir, None, dtype)
        fresh = lambda: copy.deepcopy(base)  # noqa: E731
    # the reference's base: the same weights, dense (for QLoRA: the 4-bit weights dequantized, see QLORA_REFERENCE)
    refused = (cell.model_type, cell.task, method) in HF_LORAX_REFUSES
    ref_dir = dequantized_copy(cell, base_dir, folder / "ref_base", bnb) if bnb and not refused else base_dir
    probe = fresh()
    targets = list(PEFT_TARGETS[cell.model_type]) if explicit_targets else default_targets(cell, probe)
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
        ref_base = load_base(cell, ref_dir, dtype=dtype) if bnb else fresh()
        ref = get_peft_model(ref_base, peft_equivalent(config, heads))
        loaded = set_peft_model_state_dict(ref, get_peft_model_state_dict(model))
        assert not loaded.unexpected_keys, loaded.unexpected_keys
        ref_before = outputs(ref, inputs) if bnb else None
        ref_loss, ref_grads = train_step(ref, batch)
        ref_out = outputs(ref, inputs)
    except Exception as exc:
        raise PeftReferenceError(f"plain peft failed on {cell.id}/{method}: {exc!r}") from exc

    if bnb:  # float32: the forward is compared before the step, at TOL (see FLOAT32_STEP_TOL)
        torch.testing.assert_close(outputs(model, inputs), ref_before, rtol=0, atol=TOL)
    loss, grads = train_step(model, batch)  # logits-free where supported: checked against transformers' own
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-5, atol=1e-6)  # transformers: float32 CE
    assert set(grads) == set(ref_grads), sorted(set(grads) ^ set(ref_grads))
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item() if ref_grads[name].numel() else 0.0
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-4 * scale + 1e-7,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    out = outputs(model, inputs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=FLOAT32_STEP_TOL if bnb else TOL)
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


def run_matrix(params: list, workdir: Path, explicit_targets: bool = False, extra: list[dict] = ()) -> dict:
    """Run every case in-process, then reload all saved ones with plain peft in one subprocess (with ``extra``:
    entries of cells saved otherwise, e.g. an adapter altered on disk, reloaded in the same process; each gets its
    plain-peft result under ``"peft"`` and is in the results by its ``id``)."""
    results, entries = {entry["id"]: entry for entry in extra}, list(extra)
    for param in params:
        cell, method = param.values
        key = f"{cell.id}-{method}"
        try:
            entry = run_cell(cell, method, workdir, explicit_targets)
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
