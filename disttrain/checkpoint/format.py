"""What a checkpoint is on disk, and reading one safely.

A checkpoint is one file written by global rank 0 (temporary file, fsync, rename: complete
only once its final name exists), or under FSDP a directory of DCP shards that global rank 0
completes by rename. It holds the module, optimizers, schedulers, GradScaler, loop progress,
the RNG states of **every** rank, callback states, the resolved config and the versions. It
is read with ``torch.load(weights_only=True)``: a checkpoint can never run code."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from disttrain.storage.atomic import atomic_write_with, replace

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


def write(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    atomic_write_with(path, lambda f: torch.save(checkpoint, f))


def file_name(epoch: int, step: int) -> str:
    """The name a checkpoint of ``epoch`` after optimizer step ``step`` gets."""
    return f"epoch={epoch}-step={step}{SUFFIX}"


META = "meta.pt"  # in a sharded checkpoint directory: everything but the weights


def sharded_tmp(path: str | os.PathLike) -> Path:
    """Where every rank writes its shards before global zero completes the checkpoint."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def finish_sharded(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Global zero, after every shard and DCP's metadata are written: add the rest, then
    put the directory at its final name -- complete only from then on. A checkpoint of the
    same name (a file or a directory) is replaced without a moment where neither is
    complete (``atomic.replace``)."""
    path, tmp = Path(path), sharded_tmp(path)
    if not (tmp / ".metadata").exists():
        raise CheckpointError(f"{tmp}: DCP wrote no .metadata; the checkpoint is incomplete")
    write(tmp / META, checkpoint)
    replace(tmp, path)


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


def _check_dcp_metadata(path: Path) -> None:
    try:
        with path.open("rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: refused: {err}. disttrain reads checkpoints so that a file can never "
            "run code."
        ) from None


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def check_path(path: str | os.PathLike) -> None:
    """What can be told of a checkpoint path without reading it (before workers start)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir() and not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a checkpoint (a directory without DCP .metadata)")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupted?): not a torch.save file"
        )


def load(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read and check a checkpoint; ``CheckpointError`` names the file and what is wrong.
    With ``mmap`` tensors are mapped, not read: cheap when only the progress is wanted."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").exists():
            raise CheckpointError(f"{path}: sharded checkpoint without DCP .metadata (incomplete)")
        _check_dcp_metadata(path / ".metadata")
        checkpoint = load(path / META, mmap=mmap)
        checkpoint["sharded"] = str(path)
        return checkpoint
    checkpoint = read(path, mmap=mmap)
    if not is_checkpoint(checkpoint):
        kind = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise CheckpointError(
            f"{path}: not a disttrain checkpoint (format {kind!r}, expected {FORMAT!r})"
        )
    missing = [k for k in ("module", "optimizers", "progress", "rng") if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete disttrain checkpoint: no {', '.join(missing)}")
    return checkpoint


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


def read(path: str | os.PathLike, *, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """A ``torch.save`` file's content, read with ``weights_only=True`` (a checkpoint or an
    exported weights file); ``CheckpointError`` names the file and what is wrong."""
    path = Path(path)
    check_path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    # callbacks and logger objects by class name (asdict would deep-copy them, a live run too)
    options = dataclasses.asdict(dataclasses.replace(run.config, callbacks=[], logger=None))
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
    return repr(value)
