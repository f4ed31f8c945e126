"""The three rules by which a kind of storage writes a file whole, completes a directory, and
tells a complete file or directory from the leftover of an interrupted write (the contract
``location.py`` documents): rename on local disks, one PUT per object plus a written-last
marker on object stores, a hidden temporary name moved into place plus the marker elsewhere.

Each backend works on its own path strings (a local path; fsspec's path without the
protocol); ``location.Location`` pairs one with a path and is what callers use.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from disttrain.storage import atomic

Writer = Callable[[BinaryIO], object]

# Written last into a finished directory, on every backend (so a directory copied from a
# local disk to an object store stays complete); only backends without rename rely on it.
MARKER = ".complete"
MARKER_TEXT = b"written last: every other file of this directory is complete\n"

TMP = ".tmp"  # the suffix of every temporary name: hidden (a leading dot), never complete

# object stores, where one PUT (or a completed multipart upload) appears whole or not at all
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def leftover_of(name: str, pattern: str) -> bool:
    """Whether ``name`` is a temporary name of something ``pattern`` names: the hidden
    ``.NAME.tmp`` or ``.NAME.XXXX[.removed].tmp`` of an interrupted write or removal."""
    return name.startswith(".") and fnmatch.fnmatch(name[1:], f"{pattern}*{TMP}")


class Backend:
    """The operations of one kind of storage, on its own path strings."""

    renames = False  # completes files and directories by renaming hidden temporary ones

    def url(self, path: str) -> str:
        raise NotImplementedError

    def join(self, path: str, *parts: str) -> str:
        raise NotImplementedError

    def parent(self, path: str) -> str:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def is_dir(self, path: str) -> bool:
        raise NotImplementedError

    def names(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted ([] when there is no such directory)."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def open_read(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def write_with(self, path: str, writer: Writer) -> None:
        raise NotImplementedError

    def staging(self, path: str) -> str:
        raise NotImplementedError

    def begin_directory(self, path: str) -> str:
        raise NotImplementedError

    def finish_directory(self, staging: str, path: str) -> None:
        raise NotImplementedError

    def is_complete(self, path: str) -> bool:
        raise NotImplementedError

    def remove_incomplete(self, directory: str, pattern: str) -> list[str]:
        raise NotImplementedError


class LocalFiles(Backend):
    """Local paths and ``file://``: written under a hidden temporary name, fsynced and renamed
    (``atomic.py``), so a visible name only ever holds a complete file or directory."""

    renames = True

    def url(self, path: str) -> str:
        return path

    def join(self, path: str, *parts: str) -> str:
        return os.path.join(path, *parts)

    def parent(self, path: str) -> str:
        return str(Path(path).parent)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def names(self, path: str) -> list[str]:
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def remove(self, path: str) -> None:
        """A directory is first renamed to a hidden temporary name (one step), so that an
        interrupted deletion never leaves part of one at its visible name."""
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            aside = target.with_name(f".{target.name}.{secrets.token_hex(4)}.removed{TMP}")
            os.replace(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def open_read(self, path: str) -> BinaryIO:
        return open(path, "rb")  # the caller closes it

    def write_with(self, path: str, writer: Writer) -> None:
        atomic.atomic_write_with(path, writer)

    def staging(self, path: str) -> str:
        target = Path(path)
        return str(target.with_name(f".{target.name}{TMP}"))

    def begin_directory(self, path: str) -> str:
        staging = Path(self.staging(path))
        if staging.exists():  # an interrupted write's
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        return str(staging)

    def finish_directory(self, staging: str, path: str) -> None:
        atomic.atomic_write_with(os.path.join(staging, MARKER), lambda f: f.write(MARKER_TEXT))
        atomic.replace(Path(staging), Path(path))

    def is_complete(self, path: str) -> bool:
        return not os.path.basename(path).startswith(".") and os.path.exists(path)

    def remove_incomplete(self, directory: str, pattern: str) -> list[str]:
        """Puts back what an interrupted ``atomic.replace`` had renamed aside, then deletes
        the hidden temporary files and directories of interrupted writes and removals."""
        if not os.path.isdir(directory):
            return []
        atomic.recover(Path(directory))
        removed = []
        for name in self.names(directory):
            if leftover_of(name, pattern):
                path = os.path.join(directory, name)
                _remove_local(Path(path))
                removed.append(path)
        return removed


class FsspecStore(Backend):
    """Any fsspec filesystem but the local one: a directory is written in place and complete
    once its marker, written last, exists; it is removed marker first. Files: see the
    subclasses. Every query asks the store itself (fsspec's listing cache is dropped first:
    another process may have written or removed something since)."""

    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    def url(self, path: str) -> str:
        return cast(str, self.fs.unstrip_protocol(path))

    def join(self, path: str, *parts: str) -> str:
        return posixpath.join(path, *parts)

    def parent(self, path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    def _fresh(self) -> AbstractFileSystem:
        self.fs.invalidate_cache()
        return self.fs

    def exists(self, path: str) -> bool:
        return bool(self._fresh().exists(path))

    def is_dir(self, path: str) -> bool:
        return bool(self._fresh().isdir(path))

    def names(self, path: str) -> list[str]:
        fs = self._fresh()
        if not fs.isdir(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    def remove(self, path: str) -> None:
        fs = self._fresh()
        if fs.isdir(path):
            marker = self.join(path, MARKER)
            if fs.exists(marker):
                fs.rm_file(marker)  # first: from here on it is incomplete
            fs.rm(path, recursive=True)
        elif fs.exists(path):
            fs.rm_file(path)

    def open_read(self, path: str) -> BinaryIO:
        return cast(BinaryIO, self.fs.open(path, "rb"))

    def staging(self, path: str) -> str:
        return path  # written in place: the marker, not a rename, completes it

    def begin_directory(self, path: str) -> str:
        """Whatever holds the name goes first, a directory's marker before its files, so a
        mix of old and new files can never look complete."""
        if self.exists(path):
            self.remove(path)
        return path

    def finish_directory(self, staging: str, path: str) -> None:
        if staging != path:
            raise ValueError(f"{self.url(path)} is written in place, not in {staging}")
        self.write_with(self.join(path, MARKER), lambda f: f.write(MARKER_TEXT))

    def is_complete(self, path: str) -> bool:
        fs = self._fresh()
        if fs.isdir(path):
            return bool(fs.exists(self.join(path, MARKER)))
        return not posixpath.basename(path).startswith(".") and bool(fs.isfile(path))

    def remove_incomplete(self, directory: str, pattern: str) -> list[str]:
        """Directories that ``pattern`` names and that have no marker, and hidden temporary
        files of interrupted moves."""
        removed = []
        for name in self.names(directory):
            path = self.join(directory, name)
            without_marker = fnmatch.fnmatch(name, pattern) and (
                self.is_dir(path) and not self.exists(self.join(path, MARKER))
            )
            if without_marker or leftover_of(name, pattern):
                self.remove(path)
                removed.append(self.url(path))
        return removed


class ObjectStore(FsspecStore):
    """S3, GCS, Azure: one object is written by one PUT or a multipart upload that is
    completed at the end, so it appears whole or not at all. A write that fails is
    discarded (its multipart upload aborted), never closed: closing would upload what was
    written so far. A killed writer leaves at most an unfinished multipart upload, which no
    listing shows (a bucket lifecycle rule deletes those)."""

    def write_with(self, path: str, writer: Writer) -> None:
        f = self.fs.open(path, "wb")
        try:
            writer(f)
        except BaseException:
            _abandon(f)
            raise
        f.close()


class MovedIntoPlace(FsspecStore):
    """Any other fsspec protocol (SFTP, HDFS, memory, ...), where an open file may be seen
    half-written: written under a hidden temporary name, then moved to its name (``mv``:
    atomic where the server renames)."""

    def write_with(self, path: str, writer: Writer) -> None:
        name = posixpath.basename(path)
        tmp = self.join(self.parent(path), f".{name}.{secrets.token_hex(4)}{TMP}")
        self.fs.makedirs(self.parent(path), exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                writer(f)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.exists(tmp):
                self.fs.rm_file(tmp)
            raise


def _abandon(f: Any) -> None:
    """Drop an fsspec file opened for writing without uploading it."""
    discard = getattr(f, "discard", None)
    if callable(discard):
        discard()
    with contextlib.suppress(AttributeError):  # not fsspec's buffered file: no late upload
        f.closed = True  # so that neither close() nor the garbage collector uploads it


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def backend_for(fs: AbstractFileSystem) -> Backend:
    """The rule ``fs``'s kind of storage follows."""
    if isinstance(fs, LocalFileSystem):
        return LocalFiles()
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return ObjectStore(fs) if protocols & OBJECT_STORES else MovedIntoPlace(fs)
