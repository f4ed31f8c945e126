"""Where DCP writes and reads a sharded checkpoint: torch's ``FileSystemWriter``/``Reader``
for a local path (or ``file://``), its fsspec writer and reader for any other URL
(``s3://``...). Pass them as ``dcp.save(state, storage_writer=storage_writer(where))`` and
``dcp.load(state, storage_reader=storage_reader(where))``, with no ``checkpoint_id``.

What DCP on fsspec needs, in torch 2.13:
* ``FsspecWriter``/``FsspecReader`` live in the private module
  ``torch.distributed.checkpoint._fsspec_filesystem`` (in its ``__all__``, not exported by
  the package). ``dcp.save(checkpoint_id=URL)`` finds them by itself, but builds them with
  no storage options, and resets a writer it is given to a ``checkpoint_id`` given too
  (``init_path`` again, without the options): so the writer, and no ``checkpoint_id``.
* ``sync_files=False`` on URLs: DCP fsyncs every file it wrote, and where the file object
  has no descriptor (every fsspec file) it calls ``os.sync()`` instead, flushing every
  filesystem of the host once per file. An upload is durable once complete; nothing to sync.
* DCP writes the shards and ``.metadata`` in place (``.metadata`` through a temporary name
  and a ``rename``, a copy on object stores); a failed write may leave a partial shard
  there. Neither makes the directory complete: ``Location.finish_directory`` does.

torch's DCP modules are imported inside the functions (``fsdp.py``: about 0.5 s of import
time that runs without FSDP do not pay).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from disttrain.storage.location import Location

if TYPE_CHECKING:
    from torch.distributed.checkpoint import StorageReader, StorageWriter


def storage_writer(where: str | os.PathLike | Location) -> StorageWriter:
    """DCP's writer of a checkpoint directory at ``where`` (a path or URL)."""
    location = Location.at(where)
    if location.local is not None:
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(location.local)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(location.url, sync_files=False, **location.storage_options)


def storage_reader(where: str | os.PathLike | Location) -> StorageReader:
    """DCP's reader of the checkpoint directory at ``where`` (a path or URL)."""
    location = Location.at(where)
    if location.local is not None:
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(location.local)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(location.url, **location.storage_options)
