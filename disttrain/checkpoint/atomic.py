"""Files a run writes: always whole, never half (temporary file, fsync, rename).

A temporary file is named ``.NAME.XXXX.tmp`` in the target's directory, so a reader that
looks for ``NAME`` (or ``*.ckpt``) never sees it, and a crash leaves only such a leftover.
Files get the mode a plain ``open(path, "w")`` would give them (``0o666`` less the umask, and
a directory's default ACL), not ``tempfile.mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> None:
    """Call ``writer(f)`` on a temporary file, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, empty ``.NAME.XXXXXXXX.tmp`` next to ``path``, opened for writing.

    ``mkstemp`` would create it with mode 0o600, so every run file (config.yaml, metrics.csv,
    checkpoints) would be unreadable by the group whatever the umask. Asking the kernel for
    0o666 lets it apply the umask (and default ACLs) itself, exactly as ``open()`` does, without
    reading the process-wide umask (``os.umask`` can only be read by setting it, a race with
    other threads creating files).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_with(path, lambda f: f.write(text.encode()))


def atomic_link(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Make ``link`` name the same file as ``target`` (a hard link, or a copy), atomically."""
    target, link = Path(target), Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        atomic_write_with(link, lambda f: f.write(target.read_bytes()))
        return
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
