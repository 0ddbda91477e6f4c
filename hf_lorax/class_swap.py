"""The one way hf_lorax gives a single model instance methods of its own: its class becomes a subclass made once.

Why a subclass and not a wrapper or instance attributes: the ``Trainer``, peft and accelerate inspect the model's
class, signature and ``isinstance``; a wrapper hides them and a bound method set on an instance is lost when the
model is pickled. The subclass keeps the base class's ``__name__`` (the ``Trainer`` looks model classes up by
it) and is named ``<prefix><base name>`` as ``__qualname__`` in this module, which :func:`__getattr__` rebuilds in a
fresh process from the registered prefix, so models pickle (``torch.save(model)``, spawned DataLoader workers).
"""

from __future__ import annotations

import functools
import importlib

_MIXINS: dict[str, tuple[type, str]] = {}  # prefix: (mixin, the package whose top level names the base classes)


def register_mixin(prefix: str, mixin: type, package: str) -> None:
    """Declare that ``<prefix><name>`` is ``mixin`` over the class ``package.<name>``."""
    _MIXINS[prefix] = (mixin, package)


def swap_class(obj, mixin: type):
    """Make ``obj`` (this one instance) an instance of ``mixin`` over its own class; returns ``obj``."""
    if not isinstance(obj, mixin):
        obj.__class__ = _subclass(mixin, type(obj))
    return obj


@functools.cache  # one subclass per (mixin, class), the same at every swap
def _subclass(mixin: type, cls: type) -> type:
    prefix = next(p for p, (m, _) in _MIXINS.items() if m is mixin)
    namespace = {"__module__": __name__, "__qualname__": prefix + cls.__name__}
    if "forward" in vars(mixin):  # the base's signature and docstring: the Trainer reads its inputs from them
        namespace["forward"] = functools.wraps(cls.forward)(lambda self, *a, **k: mixin.forward(self, *a, **k))
    return type(cls.__name__, (mixin, cls), namespace)


def __getattr__(name: str) -> type:
    """``<prefix><class name>``: the class pickle asks for by name (see the module docstring)."""
    for prefix, (mixin, package) in _MIXINS.items():
        base = getattr(importlib.import_module(package), name[len(prefix):], None) if name.startswith(prefix) else None
        if isinstance(base, type):
            return _subclass(mixin, base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
