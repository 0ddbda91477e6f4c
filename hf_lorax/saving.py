"""All-or-nothing adapter saves: a process killed mid-save leaves the previous adapter intact.

peft writes ``adapter_model.safetensors`` and ``adapter_config.json`` in place, so a crash (OOM kill,
preemption) during a save leaves a truncated file where the last good adapter was. Here the save goes to a
temporary sibling directory on the same filesystem, every file is fsync'ed, and the directory then takes
the target's place: with Linux ``renameat2(RENAME_EXCHANGE)`` in one atomic step, elsewhere with two
renames that keep the old directory until the new one is in place. Files in the target that the save does
not produce (a Trainer checkpoint's ``optimizer.pt``, other adapters' subfolders) are carried over as hard
links, so they are neither copied nor lost.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable

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
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


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
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
