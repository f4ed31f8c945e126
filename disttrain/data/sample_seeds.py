"""Random draws of a sample that depend on the sample, not on the loader worker reading it.

A map-style training dataset read by loader workers is wrapped in ``SeededSamples``: before
``dataset[i]`` the worker seeds torch's, Python's and NumPy's global generators from
``(run seed, epoch, i)``. Random augmentation in ``__getitem__`` is then a function of the
sample: the same with 1 or 8 workers, at any world size, and after a mid-epoch resume (where
a worker would otherwise start from a fresh seed and give a different batch to a different
worker). Without workers the main process draws, from the generators the checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from disttrain.data.workers import Wrapper
from disttrain.rng import sample_seed, seed_draws


class SeededSamples(Wrapper, Dataset):
    """``dataset`` with each sample's random draws seeded from ``(seed, epoch, index)``.

    Attributes not defined here are the wrapped dataset's, to read and to write
    (``Wrapper``); in a loader worker ``get_worker_info().dataset`` is the user's dataset.
    The seed and epoch live in shared memory, so persistent loader workers see each new
    epoch, and a dataset's own ``set_epoch`` is called in each worker when the epoch is new
    there.
    """

    _own = frozenset({"dataset", "_state", "_epoch_given"})

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self._state = torch.tensor([seed, 0], dtype=torch.int64).share_memory_()
        self._epoch_given = 0  # the epoch this copy's dataset was last given

    def set_epoch(self, epoch: int) -> None:
        self._state[1] = epoch
        self._give_epoch(epoch)

    def _give_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._epoch_given = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        seed, epoch = self._state.tolist()
        if epoch != self._epoch_given:  # a persistent worker's copy, in a new epoch
            self._give_epoch(epoch)
        inner = _batched_reader(self.dataset)
        if inner is not None:  # your batched reader: one seed per batch, from its first sample
            seed_draws(sample_seed(seed, epoch, indices[0]))
            return inner(indices)
        samples = []
        for index in indices:
            seed_draws(sample_seed(seed, epoch, index))
            samples.append(self.dataset[index])
        return samples


def _batched_reader(dataset: Any) -> Any:
    """``dataset.__getitems__`` if its own class reads batches (torch's ``Subset`` and the
    like only forward to ``__getitem__``: those are read sample by sample, seeded each)."""
    method = getattr(type(dataset), "__getitems__", None)
    if method is None or getattr(method, "__module__", "").startswith("torch.utils.data"):
        return None
    return dataset.__getitems__
