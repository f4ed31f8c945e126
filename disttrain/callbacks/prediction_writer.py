"""``PredictionWriter``: each rank streams its predictions to files of its own, with their
dataset indices, for outputs too large to gather (``Trainer.predict(return_predictions=False)``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from disttrain.api.hooks import Callback
from disttrain.api.state import TrainerState
from disttrain.data.transfer import move_to_device
from disttrain.storage.atomic import atomic_write_with

_INTERVALS = ("batch", "epoch")
_CPU = torch.device("cpu")


class PredictionWriter(Callback):
    """Writes ``predict_step``'s outputs under ``output_dir/rank{R}/``, each file with the
    dataset indices of its predictions; ``PredictionWriter.read(output_dir)`` puts them back
    in dataset order.

    ``write_interval="batch"`` writes ``batch{N:06d}.pt`` after every batch (nothing is held
    in memory); ``"epoch"`` holds the rank's outputs and writes ``predictions.pt`` once, in
    ``on_predict_end``. Every file is written atomically (a reader never sees half of one);
    each is ``{"indices": ..., "predictions": ...}`` (per batch, or lists over the batches),
    on the CPU. At the start of a predict, global rank 0 removes what an earlier predict left
    in ``output_dir``. Override ``write_on_batch_end`` / ``write_on_epoch_end`` to write
    elsewhere or otherwise (as Lightning's ``BasePredictionWriter``); they run on every rank
    and must not call collectives.
    """

    def __init__(self, output_dir: str | os.PathLike, write_interval: str = "batch") -> None:
        if write_interval not in _INTERVALS:
            raise ValueError(
                f"PredictionWriter(write_interval={write_interval!r}): must be one of {_INTERVALS}"
            )
        self.output_dir, self.write_interval = Path(output_dir), write_interval
        self._indices: list[list[int]] = []
        self._predictions: list[Any] = []

    def rank_dir(self, trainer: TrainerState) -> Path:
        return self.output_dir / f"rank{trainer.global_rank}"

    def on_predict_start(self, trainer: TrainerState, module: Any) -> None:
        self._indices, self._predictions = [], []
        trainer.manage_files(_clear, self.output_dir)  # collective: every rank is here

    def on_predict_batch_end(
        self, trainer: TrainerState, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        indices = list(trainer.predict_batch_indices or [])
        if self.write_interval == "batch":
            self.write_on_batch_end(trainer, module, outputs, indices, batch, batch_idx)
        else:
            self._indices.append(indices)
            self._predictions.append(move_to_device(outputs, _CPU))

    def on_predict_end(self, trainer: TrainerState, module: Any) -> None:
        if self.write_interval == "epoch":
            self.write_on_epoch_end(trainer, module, self._predictions, self._indices)
            self._indices, self._predictions = [], []

    def write_on_batch_end(
        self,
        trainer: TrainerState,
        module: Any,
        prediction: Any,
        batch_indices: list[int],
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Write one batch's prediction with its dataset indices (``write_interval="batch"``)."""
        payload = {"indices": batch_indices, "predictions": move_to_device(prediction, _CPU)}
        _save(self.rank_dir(trainer) / f"batch{batch_idx:06d}.pt", payload)

    def write_on_epoch_end(
        self,
        trainer: TrainerState,
        module: Any,
        predictions: list[Any],
        batch_indices: list[list[int]],
    ) -> None:
        """Write this rank's predictions, one entry per batch (``write_interval="epoch"``)."""
        payload = {"indices": batch_indices, "predictions": predictions}
        _save(self.rank_dir(trainer) / "predictions.pt", payload)

    @staticmethod
    def read(output_dir: str | os.PathLike) -> list[Any]:
        """Every rank's files under ``output_dir`` as one list of batch outputs in dataset
        order (as ``Trainer.predict`` returns them); an error unless the files hold each
        index from 0 up exactly once."""
        batches: list[tuple[list[int], Any]] = []
        for path in sorted(Path(output_dir).glob("rank*/*.pt")):
            entry = torch.load(path, weights_only=True)
            if path.name == "predictions.pt":
                batches += zip(entry["indices"], entry["predictions"])
            else:
                batches.append((entry["indices"], entry["predictions"]))
        batches.sort(key=lambda item: item[0][0] if item[0] else -1)
        found = [i for indices, _ in batches for i in indices]
        if found != list(range(len(found))):
            raise ValueError(
                f"{output_dir}: the prediction files do not hold each dataset index once, in "
                "blocks (files of two predicts mixed?)"
            )
        return [outputs for _, outputs in batches]


def _save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_with(path, lambda f: torch.save(payload, f))


def _clear(output_dir: Path) -> None:
    """Global zero: the ``rank*`` folders an earlier predict left (ours only)."""
    for folder in output_dir.glob("rank*"):
        if folder.is_dir() and all(p.suffix in (".pt", ".tmp") for p in folder.iterdir()):
            shutil.rmtree(folder)
