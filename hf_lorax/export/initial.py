"""Adapters whose initialisation changed the base weights, as a plain LoRA of the original base.

PiSSA, OLoRA, CorDA and LoRA-GA (peft's ``init_lora_weights``) move ``s·B0A0`` out of each base weight
before training, so the trained model is ``(W − s·B0A0) + s·BA``; a serving engine adds ``s·BA`` to the
original ``W``. With the adapter saved right after initialisation (``A0``, ``B0``), the update relative to
``W`` is ``s·(BA − B0A0) = s·[B | −B0]·[A ; A0]``: a LoRA of rank ``2r``, exact. peft's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes the same adapter from a live model;
this does it from the two saved folders. LoftQ trains against a quantized ``Q(W)``, which no LoRA of ``W``
reproduces: it is refused with the reason.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from ..adapter_files import CONFIG_FILE, SAFETENSORS_FILE, AdapterFolder, read_adapter_folder, write_json
from ..base_init import CONVERTIBLE_INITS, base_change_reason, init_family
from ..config import SIDECAR_NAME


def convert_to_original_base(folder: AdapterFolder, initial_dir: str, out_dir: str) -> AdapterFolder:
    """Write into ``out_dir`` the plain LoRA of the original base equal to ``folder`` (see the module doc)."""
    init = folder.base_changing_init
    if init is None:
        raise ValueError(f"--initial_adapter is for adapters whose initialisation changed the base; {folder.path!r} "
                         f"was trained with init_lora_weights={folder.config.get('init_lora_weights')!r}: export it "
                         "as is.")
    if init_family(init) not in CONVERTIBLE_INITS:
        raise ValueError(base_change_reason(init, "every engine"))
    if any(m.method == "dora" or m.slices for m in folder.modules):
        raise ValueError(f"{folder.path!r} combines init_lora_weights={init!r} with DoRA or fused slices; only plain "
                         "LoRA modules can be converted to the original base.")
    initial = read_adapter_folder(initial_dir)
    tensors, start = folder.load_tensors(), initial.load_tensors()
    starts = {m.name: m for m in initial.modules}
    out = {k: v for k, v in tensors.items() if "lora_" not in k}
    for module in folder.modules:
        a_key, b_key = f"{module.key}.lora_A.weight", f"{module.key}.lora_B.weight"
        first = starts.get(module.name)
        if first is None:
            raise ValueError(f"--initial_adapter {initial_dir!r} has no {a_key}; it is not the initial state of "
                             f"{folder.path!r}.")
        for key in (a_key, b_key):
            if tensors[key].shape != start[key].shape:
                raise ValueError(f"--initial_adapter {initial_dir!r}: {key} has shape {list(start[key].shape)}, the "
                                 f"trained adapter's {list(tensors[key].shape)}; it is not this adapter's initial "
                                 "state.")
        if not math.isclose(first.scaling, module.scaling, rel_tol=1e-12):
            raise ValueError(f"--initial_adapter {initial_dir!r}: {module.name} has scaling {first.scaling:g}, the "
                             f"trained adapter's {module.scaling:g} (different r or lora_alpha).")
        # B·A − B0·A0 = [B | −B0]·[A ; A0]
        out[a_key] = torch.cat([tensors[a_key], start[a_key].to(tensors[a_key].dtype)], dim=0).contiguous()
        out[b_key] = torch.cat([tensors[b_key], -start[b_key].to(tensors[b_key].dtype)], dim=1).contiguous()
    _write_converted(folder, out, out_dir)
    converted = read_adapter_folder(out_dir)
    # what the exported sidecar, and so the card, records (the temporary folder itself is not kept)
    converted.sidecar["converted_from"] = {"init_lora_weights": init, "initial_adapter": os.path.abspath(initial_dir),
                                           "adapter": os.path.abspath(folder.path)}
    return converted


def _write_converted(folder: AdapterFolder, tensors: dict, out_dir: str) -> None:
    from safetensors.torch import save_file

    config = folder.config
    factor = math.sqrt(2) if config.get("use_rslora") else 2  # rank 2r at the same scaling s
    converted = {**config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": factor * config["lora_alpha"],
                 "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                 "alpha_pattern": {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}}
    save_file(tensors, os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    write_json(os.path.join(out_dir, CONFIG_FILE), converted)
    if folder.sidecar:
        write_json(os.path.join(out_dir, SIDECAR_NAME), {**folder.sidecar, "rank_map": None, "alpha_map": None})
    # results.json, plots: what the export carries over
    for name in set(os.listdir(folder.path)) - {CONFIG_FILE, SAFETENSORS_FILE, SIDECAR_NAME}:
        if os.path.isfile(os.path.join(folder.path, name)):
            shutil.copy2(os.path.join(folder.path, name), out_dir)
