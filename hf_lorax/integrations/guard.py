"""Version ranges and signature checks for the library internals hf_lorax uses."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from packaging.version import Version


@dataclass(frozen=True)
class InternalAPI:
    """One library internal hf_lorax relies on.

    ``path`` is ``"module:Qualified.name"``; ``params`` the parameter names its signature must have (in
    order); ``library`` the distribution whose version decides; ``verified`` the half-open range
    ``[low, high)`` the suite ran against. A hooked internal is replaced as an attribute of ``hooked_on``
    (``"module:Qualified.name"``; by default the object that holds it in ``path``).
    """

    path: str
    params: tuple[str, ...]
    library: str
    verified: tuple[str, str]
    reason: str
    hooked_on: str = ""

    def problem(self) -> str | None:
        """Why this internal cannot be used as verified (version or signature), or None when it can."""
        version = Version(importlib.metadata.version(self.library))
        low, high = (Version(v) for v in self.verified)
        if not low <= version < high:
            return f"{self.library} {version} is outside the verified range [{low}, {high})"
        return self.signature_problem()

    def signature_problem(self) -> str | None:
        """Why this internal's signature no longer matches, or None when it does (any version)."""
        try:
            target = pkgutil.resolve_name(self.path)
        except (ImportError, AttributeError) as exc:
            return f"{self.path} is gone ({exc})"
        # classmethods: their function, with cls; a hooked one: the original (signature follows __wrapped__)
        params = tuple(inspect.signature(getattr(target, "__func__", target)).parameters)
        if params[: len(self.params)] != self.params:
            return f"{self.path} has the signature {params}, expected {self.params}"
        return None


_HOOKS: dict[str, bool] = {}


def install_hook(api: InternalAPI, make: Callable, fallback: str) -> None:
    """Replace ``api``'s internal with ``make(original)`` if it checks out; else warn with ``fallback`` (what still
    works) and leave it. The original stays reachable as the wrapper's ``__wrapped__``."""
    problem = api.problem()
    if problem is None:
        module_name, _, qualname = api.path.partition(":")
        parent, _, name = qualname.rpartition(".")
        owner = pkgutil.resolve_name(api.hooked_on or f"{module_name}:{parent}")
        is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
        original = getattr(owner, name).__func__ if is_classmethod else getattr(owner, name)
        wrapper = make(original)
        wrapper.__wrapped__ = original
        setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)
    else:
        warnings.warn(f"hf_lorax: not hooking {api.path} ({api.reason}): {problem}. {fallback}", UserWarning,
                      stacklevel=3)
    _HOOKS[api.path] = problem is None


def installed_hooks() -> dict[str, bool]:
    """``{hook path: installed}`` for every hook :func:`hf_lorax.hooks.install` considered."""
    return dict(_HOOKS)


# checked once per internal: the installed libraries do not change while the process runs
_signature_problem = functools.cache(InternalAPI.signature_problem)


def require_signatures(apis: list[InternalAPI], what: str) -> None:
    """Raise a ``RuntimeError`` naming every internal in ``apis`` whose signature changed (checked once)."""
    problems = [p for api in apis if (p := _signature_problem(api)) is not None]
    if problems:
        raise RuntimeError(f"hf_lorax cannot {what} with this library version: " + "; ".join(problems) +
                           ". Install a version in the verified range (see hf_lorax.integrations).")
