"""Files a run writes: always whole, never half (temporary file, fsync, rename).

A temporary file is named ``.NAME.XXXX.tmp`` in the target's directory, so a reader that
looks for ``NAME`` (or ``*.ckpt``) never sees it, and a crash leaves only such a leftover.
``replace`` puts a complete file or directory at a name that holds one of either kind, so
that a crash at any point leaves the old or the new one there (``recover`` tidies up after).
Files get the mode a plain ``open(path, "w")`` would give them (``0o666`` less the umask, and
a directory's default ACL), not ``tempfile.mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


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
        replace(Path(tmp), path)
    except BaseException:
        _discard(Path(tmp))
        raise


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
    replace(tmp, link)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def replace(new: Path, path: Path) -> None:
    """Put ``new`` (a complete file or directory) at ``path``, whatever is there, of either
    kind, so that a crash at any point leaves a complete one under ``path``, old or new.

    A file over a file or over nothing: one ``os.replace``. Where a directory is involved
    (a sharded checkpoint of the same name, or written over one), ``os.replace`` cannot
    (``IsADirectoryError``, a non-empty directory), so the two are exchanged in one step
    (Linux ``renameat2(RENAME_EXCHANGE)``) and the old one, now under ``new``'s temporary
    name, deleted. Where the OS or the filesystem cannot exchange (NFS, macOS), the old
    one is first renamed aside to ``.NAME.XXXX.replaced``: a crash before the new one is in
    place leaves it there, and ``recover`` (run before a resume chooses its checkpoint)
    puts it back.
    """
    if not os.path.lexists(path) or (new.is_file() and not path.is_dir()):
        os.replace(new, path)
    elif _exchange(new, path):
        _discard(new)  # the old one, under the temporary name
    else:
        aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}{REPLACED}")
        os.replace(path, aside)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(aside, path)
            raise
        _discard(aside)
    _fsync_dir(path.parent)


REPLACED = ".replaced"  # the suffix of an old file or directory renamed aside by replace()


def recover(directory: Path) -> None:
    """After a crash inside ``replace``'s fallback: an old one renamed aside goes back to its
    name if the new one never arrived there, and is deleted if it did."""
    for aside in directory.glob(f".*{REPLACED}"):
        original = directory / aside.name[1:].rsplit(".", 2)[0]
        if os.path.lexists(original):
            _discard(aside)
        else:
            os.replace(aside, original)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _load_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl
    except (AttributeError, OSError, TypeError):  # no renameat2; no C library as None
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _exchange_available() -> bool:
    return _renameat2 is not None


def _exchange(a: Path, b: Path) -> bool:
    """Swap what the names ``a`` and ``b`` hold, in one step; False where that cannot be
    done here (no ``renameat2``, or a filesystem that does not support the exchange)."""
    if _renameat2 is None:
        return False
    names = os.fsencode(a), os.fsencode(b)
    if _renameat2(_AT_FDCWD, names[0], _AT_FDCWD, names[1], _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
