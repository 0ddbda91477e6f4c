"""The saved adapter folder: one module reads, checks and writes it.

A folder holds peft's ``adapter_config.json`` and ``adapter_model.safetensors``, hf_lorax's ``hf_lorax.json``
sidecar, and optionally ``README.md`` (the model card), ``results.json`` and the rank-utilization files.

* :func:`read_sidecar` / :func:`read_adapter_folder`: the sidecar with its format check, and the folder
  parsed into per-module rows (rank and alpha per slice, scaling, method, parameters);
* :func:`check_adapter_dir`: a broken config or weights file fails with its name, not deep in torch;
* :func:`read_adapter_config`: the config of a saved adapter, a local folder or a Hub repo
  (:func:`fetch_sidecar` downloads a Hub adapter's sidecar);
* :func:`atomic_directory_write`, :func:`write_json`, :func:`write_text`: the only writers. A save goes to a
  temporary sibling directory on the same filesystem, every file is fsync'ed, and the directory then takes
  the target's place: with Linux ``renameat2(RENAME_EXCHANGE)`` in one atomic step, elsewhere with two
  renames that keep the old directory until the new one is in place. Files in the target that the save does
  not produce (a Trainer checkpoint's ``optimizer.pt``, other adapters' subfolders) are carried over as hard
  links, so they are neither copied nor lost. Single files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, PeftConfig

from .base_init import base_changing_init, reload_problem
from .config import SIDECAR_FORMAT, SIDECAR_NAME, LoRAConfig
from .integrations.peft_api import pattern_value
from .slices import SliceSpec, lora_scaling, parse_fused_slices, slice_alpha, slice_rank, spec_for

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# adapter_config.json keys hf_lorax reads; one a file leaves out has peft's default (``LoraConfig``'s)
PEFT_DEFAULTED_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "bias",
                       "lora_bias", "modules_to_save", "init_lora_weights")

# -- reading ---------------------------------------------------------------------------------------------


def read_json(path: str) -> dict:
    """A JSON file; a damaged one is a ``ValueError`` naming the file (json's own message names no file)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON (truncated or edited?): {exc}") from exc


def read_sidecar(directory: str) -> dict | None:
    """The ``hf_lorax.json`` of a local adapter directory, or None if it has none."""
    path = os.path.join(directory, SIDECAR_NAME)
    if not os.path.isfile(path):
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format_version") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not an hf_lorax sidecar of format {SIDECAR_FORMAT}.")
    return data


@dataclass
class SavedModule:
    """One adapted module of a saved adapter. ``r`` / ``alpha`` are per slice; ``module_r`` as stored."""

    name: str
    key: str  # the state-dict prefix, e.g. "base_model.model.h.0.attn.c_attn"
    r: int
    alpha: float
    module_r: int
    scaling: float
    method: str
    params: int
    slices: SliceSpec | None = None


@dataclass
class AdapterFolder:
    """A saved adapter folder, parsed: its config, sidecar, tensor shapes and per-module rows."""

    path: str
    config: dict
    sidecar: dict
    shapes: dict[str, list[int]] = field(default_factory=dict)
    modules: list[SavedModule] = field(default_factory=list)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, SAFETENSORS_FILE)

    @property
    def method(self) -> str:
        return self.sidecar.get("method") or ("dora" if self.config.get("use_dora") else "lora")

    @property
    def base_changing_init(self) -> str | None:
        """The ``init_lora_weights`` the adapter was trained with if that initialisation changed the base."""
        return base_changing_init(self.config.get("init_lora_weights"))

    @property
    def adapter_params(self) -> int:
        """Trainable parameters the adapter holds: LoRA factors (per slice), DoRA magnitudes, task heads."""
        return sum(m.params for m in self.modules) + sum(math.prod(s) for k, s in self.shapes.items() if "lora_" not in k)

    @property
    def heads(self) -> list[str]:
        """The ``modules_to_save`` entries (task heads) that have tensors in the weights file."""
        names = [k.removeprefix("base_model.model.") for k in self.shapes if "lora_" not in k]
        listed = sorted(set(self.config.get("modules_to_save") or []))
        return [h for h in listed if any(f".{h}." in f".{n}" for n in names)]

    def load_tensors(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.weights_path)


def read_adapter_folder(path: str) -> AdapterFolder:
    """Check and parse a saved adapter folder (safetensors weights)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Adapter folder {path!r} does not exist.")
    peft_config = check_adapter_dir(path)  # also refuses a folder without adapter_model.safetensors
    config = read_json(os.path.join(path, CONFIG_FILE))
    for key in PEFT_DEFAULTED_KEYS:  # a key the file leaves out has peft's default, as when peft loads it
        config.setdefault(key, getattr(peft_config, key, None))
    folder = AdapterFolder(path=path, config=config, sidecar=read_sidecar(path) or {},
                           shapes=_tensor_shapes(os.path.join(path, SAFETENSORS_FILE)))
    sliced = folder.sidecar.get("sliced_modules") or {}
    specs = parse_fused_slices(folder.sidecar.get("slice_layouts") or folder.sidecar.get("fused_slices"))
    rslora = bool(config.get("use_rslora"))
    for prefix, (a_shape, b_shape, magnitude) in check_factor_shapes(folder.weights_path, folder.shapes).items():
        name = prefix.removeprefix("base_model.model.")
        module_r = a_shape[0]
        configured_r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if module_r != configured_r:  # peft would build rank configured_r and refuse (or mis-scale) these tensors
            raise ValueError(f"{folder.weights_path}: {prefix}.lora_A.weight has rank {module_r}, but {CONFIG_FILE} "
                             f"gives {name} rank {configured_r} (r / rank_pattern); the config and the weights do not "
                             "belong together.")
        module_alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        spec = spec_for(name, specs) if name in sliced else None
        n = sliced.get(name, 1) if spec else 1
        b_params = sum(map(len, spec.rows(b_shape[0], name))) * slice_rank(module_r, n) if spec else math.prod(b_shape)
        folder.modules.append(SavedModule(
            name=name, key=prefix, r=slice_rank(module_r, n), alpha=slice_alpha(module_alpha, n, rslora),
            module_r=module_r, scaling=lora_scaling(module_alpha, module_r, rslora), slices=spec,
            method="dora" if magnitude else "lora", params=math.prod(a_shape) + b_params + math.prod(magnitude or [0])))
    return folder


def _tensor_shapes(weights: str) -> dict[str, list[int]]:
    """Every tensor's shape, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def check_factor_shapes(weights: str, shapes: dict[str, list[int]]) -> dict[str, tuple]:
    """Every ``lora_A`` has its ``lora_B`` (and back), both are matrices, and their ranks agree; a DoRA
    magnitude has one entry per output row. Errors name the tensor, its shape and the file.

    Returns ``{prefix: (A shape, B shape, magnitude shape or None)}`` per adapted module, in the order of the
    ``lora_A`` keys (``prefix``: the state-dict prefix, e.g. ``"base_model.model.h.0.attn.c_attn"``)."""
    endings, factors = (".lora_A.weight", ".lora_B.weight"), {}
    for prefix in dict.fromkeys(k.removesuffix(e) for k in sorted(shapes) for e in endings if k.endswith(e)):
        a_key, b_key = prefix + endings[0], prefix + endings[1]
        if a_key not in shapes or b_key not in shapes:
            held, missing = (a_key, b_key) if a_key in shapes else (b_key, a_key)
            raise ValueError(f"{weights} holds {held} but not {missing}: the file is incomplete; save the adapter "
                             "again.")
        for key in (a_key, b_key):
            if len(shapes[key]) != 2:
                raise ValueError(f"{weights}: {key} has shape {shapes[key]}; a LoRA factor is a matrix.")
        a_shape, b_shape = shapes[a_key], shapes[b_key]
        if a_shape[0] != b_shape[1]:
            raise ValueError(f"{weights}: {a_key} has rank {a_shape[0]} (shape {a_shape}) but {b_key} has "
                             f"rank {b_shape[1]} (shape {b_shape}); the factors must share one rank.")
        magnitude = shapes.get(f"{prefix}.lora_magnitude_vector")
        if magnitude is not None and magnitude != [b_shape[0]]:
            raise ValueError(f"{weights}: {prefix}.lora_magnitude_vector has shape {magnitude}; the module has "
                             f"{b_shape[0]} output rows.")
        factors[prefix] = (a_shape, b_shape, magnitude)
    return factors


# -- checking --------------------------------------------------------------------------------------------


def check_adapter_dir(path: str, allow_pickle: bool = False) -> PeftConfig:
    """Validate ``adapter_config.json`` and the weights file of ``path``; return the adapter's config.

    A pickle ``adapter_model.bin`` (which can run code when unpickled) is refused unless ``allow_pickle``;
    peft then loads it with ``torch.load(weights_only=True)``.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} has no {CONFIG_FILE}; it is not a saved adapter folder.")
    raw = read_json(config_path)
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ValueError(f"{config_path} is not a peft adapter config: it has no 'peft_type' key.")
    if raw["peft_type"] != "LORA":
        raise ValueError(f"{config_path} describes a {raw['peft_type']} adapter; hf_lorax loads LoRA/DoRA adapters.")
    read_sidecar(path)  # a damaged hf_lorax.json fails naming itself (peft's hook reads it below, as peft's file)
    try:
        config = PeftConfig.from_pretrained(path)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} holds invalid values: {exc}") from exc
    weights = os.path.join(path, SAFETENSORS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, PICKLE_FILE)):
            if not allow_pickle:
                raise ValueError(f"{path!r} holds only a pickle {PICKLE_FILE}, which can execute code when loaded. "
                                 "Convert it to safetensors, or pass allow_pickle=True to load it with "
                                 "torch.load(weights_only=True).")
            return config
        raise FileNotFoundError(f"{path!r} has {CONFIG_FILE} but no {SAFETENSORS_FILE}.")
    try:
        shapes = _tensor_shapes(weights)
    except Exception as exc:  # SafetensorError for every kind of damage, a file shorter or longer than its header too
        raise ValueError(f"{weights} is truncated or corrupt ({exc}); save the adapter again.") from exc
    check_factor_shapes(weights, shapes)  # a missing lora_B would otherwise load as zeros: an adapter doing nothing
    return config


def read_adapter_config(path: str, allow_pickle: bool = False, **hub_kwargs: Any) -> PeftConfig:
    """The config of a saved adapter, a local folder (checked by :func:`check_adapter_dir`) or a Hub repo id (with
    the user's download options): its hf_lorax config when it has an ``hf_lorax.json``, else peft's.

    Loading runs the adapter's initialisation again on the base (peft ``update_layer``): an adapter whose
    initialisation does not rebuild the base it was trained on (randomized SVD, data-driven, quantized) is refused.
    """
    if os.path.isdir(path):
        config, sidecar = check_adapter_dir(path, allow_pickle), read_sidecar(path)  # a bad sidecar fails here
    elif path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is not an adapter folder{' (it is a file)' if os.path.isfile(path) else ''} "
                                "nor a Hub repo id ('namespace/name').")
    else:  # peft downloads the adapter, hf_lorax its hf_lorax.json
        config, sidecar = PeftConfig.from_pretrained(path, **hub_kwargs), fetch_sidecar(path, **hub_kwargs)
    if problem := reload_problem(config.init_lora_weights, bool(config.use_dora)):
        raise ValueError(f"{path!r}: {problem}")
    if sidecar is not None and type(config) is LoraConfig:  # a Hub adapter, or a local one with the peft hook off
        config = LoRAConfig.from_peft_config(config, sidecar)
    return config


# the hf_hub_download options a user may give for the adapter repo (peft's and transformers' names)
HUB_DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies",
                       "etag_timeout", "endpoint", "repo_type", "user_agent", "headers")


def fetch_sidecar(repo_id: str, subfolder: str | None = None, **hub_kwargs: Any) -> dict | None:
    """The ``hf_lorax.json`` of a Hub adapter repo (with the user's ``token``, ``revision``, ``cache_dir``, ...),
    or None when the repo has none (a plain peft adapter).

    Called by :func:`read_adapter_config` (:func:`hf_lorax.get_model`) for a repo id only: plain peft loading never
    reaches it, so a plain peft adapter costs no extra request there. Authentication, gating and connection errors propagate unchanged: the
    adapter would fail to load with them anyway. Offline with the file not cached, the adapter loads as plain peft
    LoRA (the same function: fused slices are saved as exact dense LoRA), with a warning.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_DOWNLOAD_KWARGS and v is not None}
    try:
        path = hf_hub_download(repo_id, SIDECAR_NAME, subfolder=subfolder, **kwargs)
    except LocalEntryNotFoundError as exc:  # offline and not cached (a subclass of EntryNotFoundError: first)
        logging.getLogger(__name__).warning("Could not fetch %s of %s (%s); loading it as a plain peft LoRA adapter.", SIDECAR_NAME,
                       repo_id, exc)
        return None
    except EntryNotFoundError:  # the repo has no hf_lorax.json: a plain peft adapter
        return None
    return read_sidecar(os.path.dirname(path))


# -- writing ---------------------------------------------------------------------------------------------


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, data) -> str:
    """:func:`write_text` of ``data`` as indented JSON."""
    return write_text(path, json.dumps(data, indent=2, default=str))


_TMP_MARK = ".hf_lorax-tmp-"


def atomic_directory_write(target: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_dir)`` and make what it wrote appear at ``target`` all at once."""
    target = os.path.abspath(target)
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file; adapters are saved into a directory.")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP_MARK}{os.getpid()}-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(target):
            _link_missing(target, tmp)
        _fsync_tree(tmp)
        if not os.path.isdir(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the previous content
        else:
            backup = tmp + ".old"
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_missing(source: str, dest: str) -> None:
    """Hard-link into ``dest`` every file of ``source`` that ``dest`` does not have (recursively)."""
    for entry in os.scandir(source):
        there = os.path.join(dest, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if not os.path.exists(there):
                os.mkdir(there)
            if os.path.isdir(there):
                _link_missing(entry.path, there)
        elif not os.path.lexists(there):
            try:
                os.link(entry.path, there)
            except OSError:  # filesystems without hard links
                shutil.copy2(entry.path, there)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync_dir(folder)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open or fsync a directory
        _fsync(path)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_stale_temps(parent: str, name: str) -> None:
    """Delete temporary directories that killed saves of ``name`` left behind."""
    prefix = f".{name}{_TMP_MARK}"
    for entry in os.scandir(parent):
        pid = entry.name.removeprefix(prefix).split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
