"""``install()``: the hooks of :mod:`hf_lorax.integrations`, run once by ``import hf_lorax``."""

from __future__ import annotations

from . import peft_hooks, transformers_hooks
from .guard import installed_hooks

_INSTALLED = False


def install() -> dict[str, bool]:
    """Install every hook whose library version and signature check out (idempotent); ``{hook: installed}``."""
    global _INSTALLED
    if not _INSTALLED:
        peft_hooks.install()
        transformers_hooks.install()
        _INSTALLED = True
    return installed_hooks()
