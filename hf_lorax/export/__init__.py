"""``export_adapter``: write an adapter in the form a serving engine computes exactly.

vLLM, TGI and LoRAX read one ``lora_alpha`` and ``r`` for all modules and ignore ``rank_pattern`` /
``alpha_pattern`` (:mod:`hf_lorax.serving`), so an adapter with a rank or alpha map is served silently wrong
as saved. For those engines the export:

* bakes each module's own scaling into its ``B`` and writes one ``lora_alpha = r`` (scaling 1): exact;
* pads every module with zeros to one rank (the largest, or ``rank``): exact;
* refuses, with the reason, what the engine cannot run: DoRA magnitudes, task heads (``modules_to_save``), trained
  biases, architectures it has no LoRA support for. ``merge=True`` writes the merged full model instead (any
  adapter, exact; serve it as a base model).

For ``engine="peft"`` the adapter is copied as a plain peft adapter (peft reads the per-module patterns).
``results.json`` is carried over, ``hf_lorax.json`` rewritten for the exported form, the card re-rendered.
``src`` is never changed, and ``dst`` is written all-or-nothing. CLI: ``python -m hf_lorax.export``.
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..adapter_files import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterFolder,
    atomic_directory_write,
    read_adapter_folder,
    read_json,
    write_json,
)
from ..base_init import PEFT_REBUILT_INITS, base_change_reason
from ..base_model import load_base_model
from ..card import write_model_card
from ..config import SIDECAR_FORMAT, SIDECAR_NAME
from ..model import get_model
from ..serving import (
    BIASES,
    DORA,
    HEADS,
    MODEL_TYPE,
    check_serving,
    engine_spec,
    loaded_values,
    next_rank_value,
)

CARRIED_FILES = ("results.json", "rank_utilization.png", "rank_utilization.json", "suggested_rank_map.json")


@dataclass
class ExportResult:
    """What :func:`export_adapter` wrote."""

    dst: str
    engine: str
    kind: str  # "adapter" or "merged model"
    rank: int | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join([f"wrote {self.kind} for {engine_spec(self.engine).label} to {self.dst}"
                          + (f" (rank {self.rank})" if self.rank else ""), *self.notes])


def export_adapter(src: str, dst: str, engine: str = "vllm", *, rank: int | None = None, merge: bool = False,
                   base_model=None) -> ExportResult:
    """Export the adapter saved in ``src`` to ``dst`` for ``engine`` ("vllm", "tgi", "lorax" or "peft").

    Example::

        from hf_lorax.export import export_adapter
        export_adapter("runs/sst2/adapter", "runs/sst2/vllm", engine="vllm")
        export_adapter("runs/dora/adapter", "runs/dora/merged", engine="vllm", merge=True)

    ``base_model`` (an ``nn.Module``, which is copied and left as it is, or a path) is needed for ``merge``; by
    default the adapter's ``base_model_name_or_path`` is loaded. An adapter whose initialisation changed the base (PiSSA,
    OLoRA, CorDA, LoRA-GA, LoftQ: :mod:`hf_lorax.base_init`) is refused with the reason and peft's conversion
    (peft rebuilds a PiSSA / OLoRA base itself, so ``engine="peft"`` copies those as they are).
    """
    spec = engine_spec(engine)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be a positive integer.")
    if rank is not None and merge:
        raise ValueError("rank pads an adapter export to one rank; a merged model (merge=True) has none: drop it.")
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([src_real, dst_real]) == src_real:
        raise ValueError(f"destination {dst!r} is inside the source adapter {src!r}; choose a folder outside it.")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"destination {dst!r} exists and is not an empty folder; choose a new one.")
    folder = read_adapter_folder(src)
    embedding = [k for k in folder.shapes if "lora_embedding_" in k]
    if embedding:
        raise ValueError(f"{src!r} adapts embeddings ({embedding[0]}); export handles linear layers only.")
    if init := folder.base_changing_init:
        if engine == "peft" and not merge and init.lower() in PEFT_REBUILT_INITS:
            return _export_for_peft(folder, dst)
        raise ValueError(base_change_reason(init, "a merge" if merge else spec.label, bool(folder.config.get("use_dora"))))
    if merge:
        return _export_merged(folder, dst, engine, base_model)
    if engine == "peft":
        return _export_for_peft(folder, dst)
    return _export_uniform(folder, dst, spec, rank)


def _export_uniform(folder: AdapterFolder, dst: str, spec, rank) -> ExportResult:
    config = folder.config
    # what the engine cannot read comes from the one rule table (hf_lorax.serving); here, what export does about it
    report = check_serving(folder, spec.name)
    for finding in filter(None, (report.first(code) for code in (MODEL_TYPE, DORA, BIASES, HEADS))):
        raise ValueError(f"{folder.path!r} cannot be exported as an adapter for {spec.label}: "
                         + (f"{finding.module}: " if finding.module else "") + finding.message)

    target = rank if rank is not None else max(m.module_r for m in folder.modules)
    for module in folder.modules:
        if module.module_r > target:
            raise ValueError(f"module {module.name} has rank {module.module_r}, above --rank {target}; "
                             f"pass --rank {module.module_r} or more.")
    if spec.max_rank is not None and target > spec.max_rank:
        worst = max(folder.modules, key=lambda m: m.module_r)
        raise ValueError(f"module {worst.name} has rank {worst.module_r}, above {spec.label}'s limit {spec.max_rank}; "
                         "export with --merge for a full model.")

    tensors = folder.load_tensors()
    out, result = {}, ExportResult(dst=dst, engine=spec.name, kind="adapter", rank=target)
    for module in folder.modules:
        A, B = bake_and_pad(tensors[f"{module.key}.lora_A.weight"], tensors[f"{module.key}.lora_B.weight"],
                            module.scaling, target)
        out[f"{module.key}.lora_A.weight"], out[f"{module.key}.lora_B.weight"] = A.contiguous(), B.contiguous()

    new_config = {**loaded_values(folder), **config, "r": target, "lora_alpha": target, "use_rslora": False,
                  "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "modules_to_save": None}
    rank_value = next_rank_value(target, spec)
    if spec.rank_values:
        result.notes.append(f"serve with --max-lora-rank {rank_value} (or more)")

    def write(tmp: str) -> None:
        save_file(out, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, CONFIG_FILE), new_config)
        write_json(os.path.join(tmp, SIDECAR_NAME), _exported_sidecar(folder, spec.name, target))
        _finish(folder, tmp, dst)

    atomic_directory_write(dst, write)
    written = check_serving(dst, spec.name)  # anything but an adapter the engine serves as is: a bug, not a user error
    if not written.servable_as_is:
        raise RuntimeError(f"hf_lorax.export wrote an adapter {spec.name} would not serve exactly:\n{written}")
    result.notes.append("serve: " + spec.serve_hint.format(rank=rank_value).replace("DIR", dst))
    return result


def bake_and_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank ``rank`` with ``B' A' = scaling · B A`` exactly: zero rows of ``A``, zero columns of ``B``.

    An engine that applies scaling 1 (``lora_alpha = r``) then computes the module's own update. ``rank`` is at least
    the module's rank (the export refuses a smaller ``--rank`` first).
    """
    r = lora_A.shape[0]
    A = torch.zeros(rank, lora_A.shape[1], dtype=lora_A.dtype)
    B = torch.zeros(lora_B.shape[0], rank, dtype=lora_B.dtype)
    A[:r] = lora_A
    B[:, :r] = (lora_B.double() * scaling).to(lora_B.dtype)
    return A, B


def _export_for_peft(folder: AdapterFolder, dst: str) -> ExportResult:
    result = ExportResult(dst=dst, engine="peft", kind="adapter",
                          notes=[f"load: {engine_spec('peft').serve_hint.replace('DIR', dst)}"])

    def write(tmp: str) -> None:
        shutil.copy2(folder.weights_path, tmp)
        written = read_json(os.path.join(folder.path, CONFIG_FILE))  # as written, plus the keys vLLM requires
        write_json(os.path.join(tmp, CONFIG_FILE), {**loaded_values(folder), **written})
        _finish(folder, tmp, dst)

    atomic_directory_write(dst, write)
    if folder.base_changing_init:
        result.notes.insert(0, f"init_lora_weights={folder.base_changing_init!r}: peft runs the initialisation "
                               "again on the original base when it loads the adapter (load the base in the dtype it "
                               "was trained in)")
    return result


def _export_merged(folder: AdapterFolder, dst: str, engine: str, base_model) -> ExportResult:
    base = _load_base(folder, base_model)
    merged = get_model(folder.path, model=base, is_trainable=False).merge_and_unload()

    def write(tmp: str) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        base_dir = base_model if isinstance(base_model, str) else folder.config.get("base_model_name_or_path")
        if base_dir and os.path.isdir(base_dir):
            for name in os.listdir(base_dir):  # the tokenizer files, so the folder serves as it is
                if name.startswith(("tokenizer", "vocab", "merges", "special_tokens_map")):
                    shutil.copy2(os.path.join(base_dir, name), tmp)
        if os.path.isfile(os.path.join(folder.path, "results.json")):  # the run's results travel with the model
            shutil.copy2(os.path.join(folder.path, "results.json"), tmp)

    atomic_directory_write(dst, write)
    serve = {"vllm": f"`vllm serve {dst}`", "tgi": f"`text-generation-launcher --model-id {dst}`",
             "lorax": f"`lorax-launcher --model-id {dst}`"}.get(engine, f"`{type(merged).__name__}.from_pretrained({dst!r})`")
    return ExportResult(dst=dst, engine=engine, kind="merged model", notes=[
        f"the adapter is merged into full weights (exact); load the folder as a base model: {serve}"])


def _finish(folder: AdapterFolder, tmp: str, dst: str) -> None:
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(folder.path, name)):
            shutil.copy2(os.path.join(folder.path, name), tmp)
    write_model_card(tmp, repo_id=os.path.basename(os.path.abspath(dst)))


def _exported_sidecar(folder: AdapterFolder, engine: str, rank: int) -> dict:
    return {
        "format_version": SIDECAR_FORMAT, "hf_lorax_version": __version__, "config_class": "LoRAConfig",
        "method": "lora", "rank_map": None, "alpha_map": None, "fused_slices": None, "sliced_modules": {},
        "num_labels": folder.sidecar.get("num_labels"),
        "exported": {"engine": engine, "from_method": folder.method, "rank": rank},
    }


def _load_base(folder: AdapterFolder, base_model):
    """The base model: given, or loaded from a path with the adapter's task class (a classifier's head, with
    ``num_labels`` from ``hf_lorax.json``), or for an adapter without a task type the class the base's
    ``config.json`` names (what engines load)."""
    import transformers
    from peft import PeftConfig

    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        return copy.deepcopy(base_model)  # the merge changes the model it works on; the caller's stays as it was
    config = PeftConfig.from_pretrained(folder.path)
    path = os.fspath(base_model) if base_model is not None else config.base_model_name_or_path
    if not path:
        raise ValueError(f"{folder.path!r} names no base model (base_model_name_or_path is empty); pass --base_model.")
    local = os.path.join(path, "config.json")
    architectures = read_json(local).get("architectures") if os.path.isfile(local) else None
    if config.task_type is None and architectures and hasattr(transformers, architectures[0]):
        return getattr(transformers, architectures[0]).from_pretrained(path)
    config.base_model_name_or_path, config.num_labels = path, folder.sidecar.get("num_labels")
    return load_base_model(config)
