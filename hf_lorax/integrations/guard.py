"""Version ranges and signature checks for the library internals hf_lorax uses."""

from __future__ import annotations

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
    ``[low, high)`` the suite ran against.
    """

    path: str
    params: tuple[str, ...]
    library: str
    verified: tuple[str, str]
    reason: str

    def resolve(self):
        module_name, _, qualname = self.path.partition(":")
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

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


def install_hook(api: InternalAPI, install: Callable[[], None], fallback: str) -> bool:
    """Run ``install`` if ``api`` checks out; else warn with ``fallback`` (what still works) and skip it."""
    problem = api.problem()
    if problem is None:
        install()
    else:
        warnings.warn(f"hf_lorax: not hooking {api.path} ({api.reason}): {problem}. {fallback}", UserWarning,
                      stacklevel=3)
    _HOOKS[api.path] = problem is None
    return problem is None


def installed_hooks() -> dict[str, bool]:
    """``{hook path: installed}`` for every hook :func:`hf_lorax.integrations.install` considered."""
    return dict(_HOOKS)


def signature_mismatches(apis: list[InternalAPI]) -> dict[str, str]:
    """``{path: problem}`` for the internals whose signature (or version) no longer matches."""
    return {api.path: problem for api in apis if (problem := api.problem()) is not None}


def wrap(owner: type, name: str, make: Callable, as_classmethod: bool = False) -> None:
    """Replace ``owner.name`` with ``make(original)``, keeping the original as ``__wrapped__``."""
    original = getattr(owner, name)
    original = original.__func__ if as_classmethod else original
    wrapper = make(original)
    wrapper.__wrapped__ = original
    setattr(owner, name, classmethod(wrapper) if as_classmethod else wrapper)


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
