"""What every hf_lorax command line shares: quiet third-party imports, argparse errors as one line.

Why: importing torch, transformers, peft and bitsandbytes can log or print lines that say nothing about the
user's command (bitsandbytes logs "Failed to load CPU gemm_4bit_forward ..." on CPUs with AVX512-BF16). A
command's output is its own result and, on a mistake, one ``error:`` line on stderr.

* :func:`quiet_imports`: a ``with`` block whose imports run with logging, ``warnings`` and output (fds 1
  and 2) held back; what was held back is written out after all if the import fails;
* :func:`quiet_startup`: called first by ``hf_lorax/__init__.py``; in a process started as an hf_lorax
  command (:func:`is_command_line`) it imports the heavy libraries inside :func:`quiet_imports`, and does
  nothing otherwise, so ``import hf_lorax`` in a user's program changes nothing they see;
* :class:`OneLineArgumentParser`: argparse's mistakes as ``error: ...`` and exit code 2, without the usage block.

Only importing is quieted: once a command runs, hf_lorax's own warnings and errors, and every library's, show.
``HF_LORAX_DEBUG=1`` turns the quieting off (and the commands show tracebacks).

This module imports only the standard library: it runs before anything else of hf_lorax.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# imported by ``import hf_lorax``; their import-time messages are the ones a command holds back
HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes")
# a process whose main program is one of these packages' modules (``python -m ...``) is an hf_lorax command
COMMAND_PACKAGES = ("hf_lorax", "hf_lorax_paper")
# a script (scripts/*.py) declares itself an hf_lorax command with ``__hf_lorax_command__ = True`` before its imports
COMMAND_MARK = "__hf_lorax_command__"


def debug_enabled() -> bool:
    return os.environ.get("HF_LORAX_DEBUG") == "1"


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Run the block's imports with log records (WARNING and below), warnings and output held back.

    Output is held at the file-descriptor level (fds 1 and 2 point to a temporary file), not by swapping
    ``sys.stdout`` / ``sys.stderr``: a library that keeps a handle on ``sys.stderr`` at import (transformers'
    log handler does) must still reach the real stderr afterwards. On an exception the held-back output is
    written to stderr before it propagates: a failing import keeps its explanation.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with tempfile.TemporaryFile() as held, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = []  # (fd, saved copy) pairs: none where an fd is not open
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            if stream is not None:
                stream.flush()
            with contextlib.suppress(OSError):  # not open: nothing to hold back
                saved.append((fd, os.dup(fd)))
                os.dup2(held.fileno(), fd)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            for stream in (sys.stdout, sys.stderr):  # what the block wrote stays held back
                if stream is not None:
                    stream.flush()
            for fd, copy in reversed(saved):
                os.dup2(copy, fd)
                os.close(copy)
            logging.disable(previous)
            if not succeeded:  # a failing import keeps its explanation
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def main_module(orig_argv: list[str] | None = None) -> str | None:
    """The module a ``python -m MODULE`` process runs (from ``sys.orig_argv``), or None for scripts and ``-c``."""
    args = iter((orig_argv if orig_argv is not None else getattr(sys, "orig_argv", []))[1:])
    for token in args:
        if token.startswith("-m"):  # "-m MODULE" or "-mMODULE"
            return token[2:] or next(args, None)
        if token in ("-c", "-") or not token.startswith("-"):
            return None
        if token in ("-X", "-W"):
            next(args, None)
    return None


def is_command_line() -> bool:
    """Whether this process was started as an hf_lorax command (``python -m hf_lorax.export``, a task script)."""
    marked = getattr(sys.modules.get("__main__"), COMMAND_MARK, False)
    return bool(marked) or (main_module() or "").split(".")[0] in COMMAND_PACKAGES


def quiet_startup() -> None:
    """In an hf_lorax command, import :data:`HEAVY_MODULES` inside :func:`quiet_imports` (see the module doc)."""
    if not is_command_line() or debug_enabled():
        return
    with quiet_imports():
        for name in HEAVY_MODULES:
            # optional ones (bitsandbytes) may be missing; a required one fails again, loudly, where it is used
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its mistakes reported as one ``error:`` line (naming the flag) and exit code 2. A flag that was
    removed (``removed``: ``{flag: what replaces it}``) is named with its replacement, not as merely unrecognized."""

    def __init__(self, *args, removed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.removed = removed or {}

    def error(self, message: str):
        words = message.replace("=", " ").split() if message.startswith("unrecognized arguments") else []
        gone = [f"{flag} was removed; {instead}. See hf_lorax's CHANGELOG.md." for flag, instead in self.removed.items()
                if flag in words]
        self.exit(2, f"error: {'; '.join(gone) or message}\n")
