"""Version ranges and signature checks for the library internals hf_lorax uses."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
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

    def resolve(self, path: str = ""):
        module_name, _, qualname = (path or self.path).partition(":")
        return functools.reduce(getattr, filter(None, qualname.split(".")), importlib.import_module(module_name))

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
            target = self.resolve()
            target = inspect.unwrap(getattr(target, "__func__", target))  # classmethods: their function, with cls
        except (ImportError, AttributeError) as exc:
            return f"{self.path} is gone ({exc})"
        params = tuple(inspect.signature(target).parameters)
        if params[: len(self.params)] != self.params:
            return f"{self.path} has the signature {params}, expected {self.params}"
        return None


_HOOKS: dict[str, bool] = {}


def install_hook(api: InternalAPI, make: Callable, fallback: str) -> bool:
    """Replace ``api``'s internal with ``make(original)`` if it checks out; else warn with ``fallback`` (what still
    works) and leave it. The original stays reachable as the wrapper's ``__wrapped__``."""
    problem = api.problem()
    if problem is None:
        module_name, _, qualname = api.path.partition(":")
        parent, _, name = qualname.rpartition(".")
        owner = api.resolve(api.hooked_on or f"{module_name}:{parent}")
        is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
        original = getattr(owner, name)
        original = original.__func__ if is_classmethod else original
        wrapper = make(original)
        wrapper.__wrapped__ = original
        setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)
    else:
        warnings.warn(f"hf_lorax: not hooking {api.path} ({api.reason}): {problem}. {fallback}", UserWarning,
                      stacklevel=3)
    _HOOKS[api.path] = problem is None
    return problem is None


def installed_hooks() -> dict[str, bool]:
    """``{hook path: installed}`` for every hook :func:`hf_lorax.hooks.install` considered."""
    return dict(_HOOKS)


def require_signatures(apis: list[InternalAPI], what: str) -> None:
    """Raise a ``RuntimeError`` naming every internal in ``apis`` whose signature changed (checked once)."""
    key = tuple(api.path for api in apis)
    if key in _CHECKED:
        return
    problems = [p for api in apis if (p := api.signature_problem()) is not None]
    if problems:
        raise RuntimeError(f"hf_lorax cannot {what} with this library version: " + "; ".join(problems) +
                           ". Install a version in the verified range (see hf_lorax.integrations).")
    _CHECKED.add(key)


_CHECKED: set[tuple[str, ...]] = set()
