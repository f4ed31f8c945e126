"""One file or directory in storage, a local path or any fsspec URL, and what a checkpoint
needs of it: ``Location.at("runs/x/checkpoints")``, ``Location.at("file:///data/ckpt")``,
``Location.at("s3://bucket/prefix")`` (the ``s3`` extra: s3fs), any other fsspec protocol.

Credentials and endpoints come from each library's usual sources (``AWS_*`` variables and
``~/.aws`` for S3, ``FSSPEC_<PROTOCOL>_<OPTION>`` variables, fsspec's config files), so the
ranks torchrun starts see what the launching shell sees; ``at`` also takes fsspec options.

The atomicity contract, per backend (``is_complete`` says whether a reader may choose a path):

* **Local paths and ``file://``** rename: a file is written to a hidden ``.NAME.XXXX.tmp``,
  fsynced and renamed (``atomic.py``); a directory is written under the hidden ``.NAME.tmp``
  (``staging``) and renamed into place by ``finish_directory``, also over a file or
  directory of the same name without a moment where neither is there. A visible name holds
  a complete file or directory; hidden names are never complete. ``remove`` renames a
  directory aside before deleting it, so a half-deleted one is hidden too.
* **Object stores** (``s3://``, ``gs://``, ``az://``; tested on S3) cannot rename: a single
  object is written by one PUT or a multipart upload completed at the end, so it appears
  whole or not at all, and a failed write is discarded, never uploaded half. A directory
  (DCP's shards) is written in place at its final name and is complete only once its
  marker ``.complete``, written last, exists: a directory without it is never complete.
  ``begin_directory`` and ``remove`` delete a marker before anything else, so a directory
  half-replaced or half-removed is incomplete. Replacing one of the same name is therefore
  not atomic there: a crash in between leaves neither the old nor the new one.
* **Any other fsspec protocol** (SFTP, HDFS, memory, ...): a file is written to a hidden
  temporary name and moved to its name; directories follow the object stores' marker rule.

``remove_incomplete(pattern)`` deletes in a directory what an interrupted write or removal
left (hidden temporaries; on marker backends, directories without their marker) and puts
back what an interrupted local replace renamed aside; it never touches a complete one, and
is called only while nothing is being written there (a resume, before the first save).

The checkpoint code (``disttrain.checkpoint``: writing, choosing, loading, removing) and
DCP's readers and writers (``dist/dcp_io.py``) go through ``Location`` alone.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any, BinaryIO

from fsspec.core import url_to_fs

from disttrain.storage.backends import MARKER, Backend, LocalFiles, Writer, backend_for

__all__ = ["MARKER", "Location", "Where", "is_complete"]


class Location:
    """A path on one backend. Build it with ``Location.at``; ``str()`` gives the local path
    or the URL back."""

    def __init__(self, backend: Backend, path: str, options: dict[str, Any]) -> None:
        self._backend, self.path, self.storage_options = backend, path, options

    @classmethod
    def at(cls, where: str | os.PathLike | Location, **storage_options: Any) -> Location:
        """The location ``where`` names: a local path, or a URL (``PROTOCOL://...``) that
        fsspec opens with ``storage_options``."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if "://" not in text:
            return cls(LocalFiles(), text, {})
        try:
            fs, path = url_to_fs(text, **storage_options)
        except ImportError as err:
            extra = " (pip install 'disttrain[s3]')" if text.startswith(("s3://", "s3a://")) else ""
            raise ImportError(f"{text}: {err}{extra}") from err
        except ValueError as err:  # an unknown protocol
            raise ValueError(f"{text}: {err}") from err
        backend = backend_for(fs)
        return cls(backend, path, {} if isinstance(backend, LocalFiles) else storage_options)

    def _at(self, path: str) -> Location:
        return Location(self._backend, path, self.storage_options)

    @property
    def url(self) -> str:
        """The local path, or the URL with its protocol."""
        return self._backend.url(self.path)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        """The local path, so that ``open``, ``Path`` and ``torch.load`` take a local
        location; a URL is no path (``TypeError``: open it with ``open_read``)."""
        if self.local is None:
            raise TypeError(f"{self.url} is not a local path: read it with open_read()")
        return self.path

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (type(self._backend), self.url) == (
            type(other._backend),
            other.url,
        )

    def __hash__(self) -> int:
        return hash((type(self._backend), self.url))

    @property
    def local(self) -> Path | None:
        """The local path (also of a ``file://`` URL); None on any other backend."""
        return Path(self.path) if isinstance(self._backend, LocalFiles) else None

    @property
    def renames(self) -> bool:
        """Whether this backend completes files and directories by renaming (else: one PUT
        per file, and a marker written last per directory)."""
        return self._backend.renames

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return self._at(self._backend.parent(self.path))

    def join(self, *parts: str) -> Location:
        return self._at(self._backend.join(self.path, *parts))

    def __truediv__(self, part: str) -> Location:
        return self.join(part)

    def exists(self) -> bool:
        return self._backend.exists(self.path)

    def is_dir(self) -> bool:
        return self._backend.is_dir(self.path)

    def entries(self, pattern: str = "*") -> list[Location]:
        """The entries of this directory whose names match ``pattern`` (``fnmatch``: ``*``
        matches hidden names too), sorted by name; [] when there is no such directory.
        Complete or not: ask ``is_complete`` before choosing one."""
        names = self._backend.names(self.path)
        return [self.join(n) for n in names if fnmatch.fnmatch(n, pattern) and n != MARKER]

    def remove(self) -> None:
        """Delete the file, or the directory and all it holds (nothing there: nothing done);
        an interrupted removal leaves an incomplete directory, never a complete-looking one."""
        self._backend.remove(self.path)

    def open_read(self) -> BinaryIO:
        """A seekable binary file object (``torch.load(f, weights_only=True)`` reads it)."""
        return self._backend.open_read(self.path)

    def write_with(self, writer: Writer) -> None:
        """Call ``writer(f)`` on a binary file object; the file appears at this name whole
        (replacing what was there) or, if the writer raises or the process dies, not at all:
        the previous file stays. Missing parent directories are created (where there are any)."""
        self._backend.write_with(self.path, writer)

    def staging(self) -> Location:
        """Where the files of a directory completed by ``finish_directory`` are written: a
        hidden sibling where the backend renames, the directory itself where it does not.
        The same on every rank; it does not touch storage."""
        return self._at(self._backend.staging(self.path))

    def begin_directory(self) -> Location:
        """Once, before anything is written into ``staging()`` (global zero, then a barrier):
        clear an interrupted write's leftovers there; where the directory is written in
        place, first withdraw whatever holds this name (marker first). Returns ``staging()``."""
        return self._at(self._backend.begin_directory(self.path))

    def finish_directory(self, staging: Location) -> None:
        """Once, after every file of ``staging`` is written: write the marker, and where the
        backend renames, put the directory at this name (replacing a file or directory
        there). Complete only from then on."""
        self._backend.finish_directory(staging.path, self.path)

    def is_complete(self) -> bool:
        """Whether a reader may choose this file or directory: written whole by the rules
        above (a visible name locally; an object, or a directory with its marker, on a
        store that cannot rename). It says nothing of what the bytes hold."""
        return self._backend.is_complete(self.path)

    def remove_incomplete(self, pattern: str = "*") -> list[str]:
        """In this directory, delete what interrupted writes and removals of entries that
        ``pattern`` names left; returns what was deleted. Never while a write is under way
        there: its files are incomplete too."""
        return self._backend.remove_incomplete(self.path, pattern)


Where = str | os.PathLike | Location  # a local path, an fsspec URL, or a Location


def is_complete(where: Where) -> bool:
    """Whether a reader may choose the checkpoint file or directory ``where`` names."""
    return Location.at(where).is_complete()
