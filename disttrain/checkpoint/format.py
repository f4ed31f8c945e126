"""What a checkpoint is on disk, and reading one safely.

A checkpoint is one file written by global rank 0, or under FSDP a directory of DCP shards
that global rank 0 completes; at a local path or any fsspec URL (``s3://...``), complete only
by the rules of ``disttrain.storage.location`` (a rename locally, one upload per file and a
marker written last per directory on object stores). It holds the module, optimizers,
schedulers, GradScaler, loop progress, the RNG states of **every** rank, callback states, the
resolved config and the versions. It is read with ``torch.load(weights_only=True)``: a
checkpoint can never run code."""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from typing import TYPE_CHECKING, Any

import torch

from disttrain.storage.location import Location, Where

if TYPE_CHECKING:  # source.py imports what imports this module
    from disttrain.checkpoint.run_view import CheckpointedRun

FORMAT = "disttrain-checkpoint/1"


SUFFIX = ".ckpt"


LAST_NAME = f"last{SUFFIX}"  # ModelCheckpoint's link to the newest checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where the loop stands when a checkpoint is taken (always at an optimizer step)."""

    epoch: int
    global_step: int
    next_batch: int  # the first batch of ``epoch`` not yet trained
    epoch_finished: bool  # validation and the epoch-end hooks of ``epoch`` have run
    # samples of ``epoch``'s order all ranks together trained, where a resumed run resharded
    # the epoch at another world size (None: ``next_batch`` batches on each rank)
    samples: int | None = None

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The progress a checkpoint holds (keys of older versions that are gone ignored, keys
        they did not have yet left at their defaults)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def resume_point(self) -> tuple[int, int]:
        """(epoch, first batch) at which training goes on."""
        return (self.epoch + 1, 0) if self.epoch_finished else (self.epoch, self.next_batch)


def write(path: Where, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path``, whole or not at all (the previous file stays otherwise)."""
    Location.at(path).write_with(lambda f: torch.save(checkpoint, f))


def file_name(epoch: int, step: int) -> str:
    """The name a checkpoint of ``epoch`` after optimizer step ``step`` gets."""
    return f"epoch={epoch}-step={step}{SUFFIX}"


META = "meta.pt"  # in a sharded checkpoint directory: everything but the weights


def sharded_staging(path: Where) -> Location:
    """Where every rank writes its shards before global zero completes the checkpoint (the
    same on every rank; nothing is touched)."""
    return Location.at(path).staging()


def begin_sharded(path: Where) -> None:
    """Global zero, before any rank writes a shard: clear an interrupted write's leftovers
    (and, where directories are written in place, withdraw what holds the name)."""
    Location.at(path).begin_directory()


def finish_sharded(path: Where, checkpoint: dict[str, Any]) -> None:
    """Global zero, after every shard and DCP's metadata are written: add the rest, then
    complete the directory (renamed into place, or its marker written last): complete only
    from then on. Locally a checkpoint of the same name (a file or a directory) is replaced
    without a moment where neither is complete (``atomic.replace``)."""
    target = Location.at(path)
    staging = target.staging()
    if not (staging / ".metadata").exists():
        raise CheckpointError(f"{staging}: DCP wrote no .metadata; the checkpoint is incomplete")
    write(staging / META, checkpoint)
    target.finish_directory(staging)


_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its ``.metadata``; read it only if it names nothing but DCP's own classes."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ours = module in (
            "torch.distributed.checkpoint.metadata",
            "torch.distributed.checkpoint.filesystem",
        )
        if dtype or ours or (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not DCP metadata")


def _check_dcp_metadata(path: Location) -> None:
    try:
        with path.open_read() as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: refused: {err}. disttrain reads checkpoints so that a file can never "
            "run code."
        ) from None


def check_path(path: Where) -> None:
    """What can be told of a checkpoint path without reading it (before workers start)."""
    where = Location.at(path)
    if not where.exists():
        raise CheckpointError(f"{where}: no such checkpoint file")
    if not where.is_complete():
        raise CheckpointError(
            f"{where}: an incomplete checkpoint (the leftover of a write that never finished)"
        )
    if where.is_dir():
        if not (where / ".metadata").exists():
            raise CheckpointError(f"{where}: not a checkpoint (a directory without DCP .metadata)")
        return
    with where.open_read() as f:
        if not zipfile.is_zipfile(f):
            raise CheckpointError(
                f"{where}: not a readable checkpoint (truncated or corrupted?): not a "
                "torch.save file"
            )


def load(path: Where) -> dict[str, Any]:
    """Read and check a checkpoint; ``CheckpointError`` names the file and what is wrong."""
    where = Location.at(path)
    if where.is_dir():
        if not (where / ".metadata").exists():
            raise CheckpointError(f"{where}: sharded checkpoint without DCP .metadata (incomplete)")
        _check_dcp_metadata(where / ".metadata")
        checkpoint = load(where / META)
        checkpoint["sharded"] = str(where)
        return checkpoint
    checkpoint = read(where)
    _check_content(where, checkpoint)
    return checkpoint


def _check_content(where: Location, checkpoint: Any) -> None:
    if not is_checkpoint(checkpoint):
        kind = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise CheckpointError(
            f"{where}: not a disttrain checkpoint (format {kind!r}, expected {FORMAT!r})"
        )
    missing = [k for k in ("module", "optimizers", "progress", "rng") if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{where}: incomplete disttrain checkpoint: no {', '.join(missing)}")


def progress_of(path: Where) -> Progress:
    """The training progress a checkpoint holds, read without its tensors: of a file only
    its pickle (a few KiB of a URL's object, however large the weights), of a sharded
    directory its ``meta.pt``. ``CheckpointError`` if it is no disttrain checkpoint."""
    where = Location.at(path)
    if where.is_dir():
        return Progress.from_dict(load(where)["progress"])
    check_path(where)
    try:
        with where.open_read() as f, zipfile.ZipFile(f) as archive:
            (pickled,) = [n for n in archive.namelist() if n.endswith("/data.pkl")][:1]
            content = _PlainDataUnpickler(archive.open(pickled)).load()
    except (ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{where}: not a readable checkpoint: {err}") from None
    _check_content(where, content)
    try:
        return Progress.from_dict(content["progress"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: its progress entry is not readable ({err!r})") from None


class _Opaque:
    """What any global in a checkpoint's pickle reads as when only its plain data is wanted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Mapping(dict):
    """An ``OrderedDict`` in the pickle (a state dict), without its attributes (``_metadata``)."""

    def __setstate__(self, state: Any) -> None:
        pass


class _PlainDataUnpickler(pickle.Unpickler):
    """A checkpoint's pickle with every tensor, class and function left out: it imports
    nothing and calls nothing (every global is ``_Opaque``), so no file can run code."""

    def find_class(self, module: str, name: str) -> Any:
        return _Mapping if (module, name) == ("collections", "OrderedDict") else _Opaque

    def persistent_load(self, pid: Any) -> Any:
        return None


def check_fits(
    model: str, own: dict[str, tuple | None], saved: dict[str, tuple | None], source: object
) -> None:
    """Refuse the weights of another model before loading them: a ``CheckpointError`` naming
    ``source`` and the first keys missing, unexpected or of another shape (``load_state_dict``
    would list every key). ``own``, ``saved``: each key's shape (None: not a tensor)."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} (checkpoint {list(saved[k] or ())}, module {list(own[k] or ())})"
        for k in own
        if k in saved and None not in (own[k], saved[k]) and own[k] != saved[k]
    ]
    kinds = [("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)]
    found = [(what, keys) for what, keys in kinds if keys]
    if found:
        detail = "; ".join(
            f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for what, keys in found
        )
        raise CheckpointError(
            f"{source}: its weights do not fit {model} (a checkpoint of another model, or of "
            f"this one built with other arguments?): {detail}"
        )


def shapes_of(state: dict[str, Any]) -> dict[str, tuple | None]:
    """Each entry's shape (a ``torch.Size``, a DTensor's whole shape), None if not a tensor."""
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def is_checkpoint(content: Any) -> bool:
    """Whether what ``read`` returned is a disttrain checkpoint (not, say, exported weights)."""
    return isinstance(content, dict) and content.get("format") == FORMAT


def read(path: Where, *, map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file's content, read with ``weights_only=True`` (a checkpoint or an
    exported weights file); ``CheckpointError`` names the file and what is wrong."""
    path = Location.at(path)
    check_path(path)
    try:
        if path.local is not None:
            return torch.load(path.local, map_location=map_location, weights_only=True)
        with path.open_read() as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        found = [line for line in lines if "GLOBAL" in line]  # a class or function it refused
        if not found:  # not an object it refused: bytes that are no pickle at all
            reason = lines[-1] if lines else "unpickling failed"
            raise CheckpointError(
                f"{path}: not a readable checkpoint (truncated or corrupted?): {reason}"
            ) from None
        reason = found[0].removeprefix("WeightsUnpickler error: ").split(" Please use")[0]
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain data ({reason}). "
            "disttrain loads checkpoints with weights_only=True, so a file can never run code."
        ) from None
    except Exception as err:  # torch.load of a damaged file raises almost anything
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupted?): {reason}"
        ) from None


def callback_keys(run: CheckpointedRun) -> dict[str, Any]:
    """Each callback under a stable key: its class name, numbered if it repeats."""
    keys: dict[str, Any] = {}
    for callback in run.callbacks:
        name = type(callback).__qualname__
        key, n = name, 1
        while key in keys:
            n += 1
            key = f"{name}#{n}"
        keys[key] = callback
    return keys


def plain_config(run: CheckpointedRun) -> dict[str, Any]:
    """The run's config as plain data: the resolved YAML config, or the trainer's options."""
    if run.resolved_config is not None:
        return _plain(run.resolved_config)
    # field by field, not asdict(replace(...)): replace validates every option again, and
    # asdict deep-copies callbacks and loggers (a live run too); this runs at every save
    options = {f.name: getattr(run.config, f.name) for f in dataclasses.fields(run.config)}
    options["callbacks"] = [type(cb).__qualname__ for cb in run.config.callbacks]
    logger = run.config.logger
    named = [_named(x) for x in logger] if isinstance(logger, list) else _named(logger)
    options["logger"] = named
    return _plain({"trainer": options})


def _named(entry: Any) -> Any:
    """A logger option's entry as plain data: a name or spec as it is, an object's class."""
    return entry if entry is None or isinstance(entry, (str, dict)) else type(entry).__qualname__


def _plain(value: Any) -> Any:
    """The config as plain data that ``weights_only`` loading accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)
