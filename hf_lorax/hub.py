"""Adapter-only publishing to the Hugging Face Hub.

``push_adapter`` uploads exactly the files of an adapter (an allowlist), refuses folders that hold base
model weights, writes ``README.md`` with :mod:`hf_lorax.card`, and needs the network only for the final
``create_repo`` / ``create_commit`` calls. Tokens come from ``huggingface_hub``'s usual login / ``HF_TOKEN``
and are never logged or written.

"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.utils import validate_repo_id

from .adapter_files import read_adapter_folder
from .card import CARD_NAME, write_model_card

logger = logging.getLogger(__name__)

UPLOADABLE = ("adapter_config.json", "adapter_model.safetensors", "hf_lorax.json", "README.md", "results.json",
              "rank_utilization.png", "rank_utilization.json", "suggested_rank_map.json", "training_curve.png")
BASE_WEIGHT_PATTERN = re.compile(r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\."
                                 r"(safetensors|bin|h5|msgpack)(\.index\.json)?$")
MAX_WEIGHTS_BYTES = 4 * 1024**3  # an adapter of 4 GiB would be a mistake long before a LoRA gets there
MAX_SIDE_FILE_BYTES = 32 * 1024**2


@dataclass
class UploadPlan:
    """What :func:`push_adapter` uploads: ``files`` is ``[(path_in_repo, local_path, bytes)]``."""

    repo_id: str
    folder: str
    files: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    commit_url: str | None = None

    def describe(self) -> str:
        lines = [f"{'file':<28} {'bytes':>14}"]
        lines += [f"{name:<28} {size:>14,}" for name, _, size in self.files]
        lines.append(f"{len(self.files)} files, {sum(s for _, _, s in self.files):,} bytes -> {self.repo_id}")
        if self.skipped:
            lines.append(f"not uploaded (not adapter files): {', '.join(self.skipped)}")
        return "\n".join(lines)


def plan_upload(folder: str, repo_id: str, results: str | None = None) -> UploadPlan:
    """Validate an adapter folder and list the files to upload; raises on anything that is not an adapter."""
    validate_repo_id(repo_id)  # an HFValidationError (a ValueError) naming it: "namespace/name", no spaces
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Adapter folder {folder!r} does not exist.")
    names = sorted(os.listdir(folder))
    base_weights = [n for n in names if BASE_WEIGHT_PATTERN.match(n)]
    if base_weights:
        raise ValueError(f"{folder!r} holds base-model weights ({', '.join(base_weights)}); push_adapter uploads "
                         "adapters only. Save the adapter with model.save_pretrained(...) into its own folder.")
    if "adapter_model.safetensors" not in names:
        raise FileNotFoundError(f"{folder!r} has no adapter_model.safetensors (pickle .bin adapters are not uploaded); "
                                "save with safe_serialization=True.")
    saved = read_adapter_folder(folder)  # config, weights and their factors checked
    base = saved.config.get("base_model_name_or_path") or ""
    if os.path.isabs(os.path.expanduser(base)) or base.startswith("."):  # what AutoPeftModel and the card load
        logger.warning("%s names its base model by a local path (%s) in adapter_config.json, which nobody else can "
                       "load from the Hub: set base_model_name_or_path to the base's Hub id before saving.", folder, base)
    heads = saved.config["modules_to_save"] or []
    foreign = [k for k in saved.shapes if "lora_" not in k and not any(f".{h}." in f".{k}" for h in heads)]
    if foreign:
        raise ValueError(f"adapter_model.safetensors in {folder!r} holds non-adapter tensors such as {foreign[:3]}; "
                         "refusing to upload what may be base-model weights.")
    paths = {n: os.path.join(folder, n) for n in names if n in UPLOADABLE and os.path.isfile(os.path.join(folder, n))}
    if results:
        if not os.path.isfile(results):
            raise FileNotFoundError(f"results file {results!r} does not exist.")
        paths.pop("results.json", None)  # the explicit results file wins
        paths["results.json"] = results
    return UploadPlan(repo_id=repo_id, folder=folder, files=[(n, p, _checked_size(p, n)) for n, p in paths.items()],
                      skipped=[n for n in names if n not in paths])


def _checked_size(path: str, name: str) -> int:
    size = os.path.getsize(path)
    bound = MAX_WEIGHTS_BYTES if name.endswith(".safetensors") else MAX_SIDE_FILE_BYTES
    if size > bound:
        raise ValueError(f"{path} is {size:,} bytes, over the {bound:,}-byte bound for {name}; it is not an adapter "
                         "file.")
    return size


# -- push -------------------------------------------------------------------------------------------------


def push_adapter(folder: str, repo_id: str, results: str | None = None, private: bool | None = None,
                 token: str | None = None, license: str | None = None, commit_message: str | None = None,
                 revision: str | None = None, dry_run: bool = False, api: Any = None) -> UploadPlan:
    """Upload an adapter folder (adapter files only) with a rendered model card.

    Example::

        push_adapter("runs/sst2/adapter", repo_id="me/roberta-base-lora-sst2",
                     results="runs/sst2/results.json", private=True)

    ``dry_run=True`` validates, writes ``README.md`` into the folder and returns the plan without any network
    call. ``token`` defaults to the usual ``huggingface_hub`` login / ``HF_TOKEN``.

    The card's "Serving" table says where the adapter runs as saved; to gate a push on one engine, check
    ``hf_lorax.check_serving(folder, "vllm").servable_as_is`` first (``python -m hf_lorax.export`` writes the form
    an engine serves exactly).
    """
    plan = plan_upload(folder, repo_id, results)
    write_model_card(folder, repo_id, results=results, license=license)
    if CARD_NAME not in [name for name, _, _ in plan.files]:
        plan.files.append((CARD_NAME, os.path.join(folder, CARD_NAME), 0))
    plan.files = [(n, p, os.path.getsize(p)) for n, p, _ in plan.files]
    if dry_run:
        return plan
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path, _ in plan.files]
    info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload {len(operations)} adapter files with hf_lorax")
    plan.commit_url = getattr(info, "commit_url", None) or str(repo_url)
    logger.info("Uploaded %d files to %s", len(plan.files), repo_id)
    return plan


# -- reading an adapter's hf_lorax.json from the Hub -------------------------------------------------------
