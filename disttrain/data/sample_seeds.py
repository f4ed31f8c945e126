"""Random draws of a sample that depend on the sample, not on the loader worker reading it.

A map-style training dataset is wrapped in ``SeededSamples``: before ``dataset[i]`` the
process reading it (a loader worker, or the rank's main process) seeds torch's, Python's and
NumPy's global generators from ``(run seed, epoch, i)``. Random draws in ``__getitem__``
(nanoGPT's random window offsets, augmentation) are then a function of the sample: the same
with 0, 1 or 8 workers, at any world size, and after a mid-epoch resume (where a worker would
otherwise start from a fresh seed). Ranks read different samples, so they draw differently.
In the main process the batch is read apart (``rng.apart``): the rank's own draws (dropout,
a step's ``torch.randint``) go on as if no batch had been read, so reading ahead (world size
> 1, ``loop/stopping.py``) changes nothing and a resumed run draws what the unbroken one did.
Seeding costs about 20 us a sample, so in the main process the first batch read tells whether
the dataset draws at all: one that does not is read plainly from then on (no cost; a dataset
that draws only for some samples should draw for the first batch's too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from disttrain.data.workers import Wrapper
from disttrain.rng import apart, draw_positions, drew_since, sample_seed, seed_draws


class SeededSamples(Wrapper, Dataset):
    """``dataset`` with each sample's random draws seeded from ``(seed, epoch, index)``.

    Attributes not defined here are the wrapped dataset's, to read and to write
    (``Wrapper``); in a loader worker ``get_worker_info().dataset`` is the user's dataset.
    The seed and epoch live in shared memory, so persistent loader workers see each new
    epoch, and a dataset's own ``set_epoch`` is called in each worker when the epoch is new
    there.
    """

    _own = frozenset({"dataset", "_state", "_epoch_given", "_draws"})

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self._state = torch.tensor([seed, 0], dtype=torch.int64).share_memory_()
        self._epoch_given = 0  # the epoch this copy's dataset was last given
        # in the rank's own process: does the dataset draw at all? (None: not known yet)
        self._draws: bool | None = None

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
        if get_worker_info() is not None:
            return self._seeded(indices)
        # the rank's own process: its draws stay its own. Seeding costs ~20 us a sample, so
        # the first batch tells whether the dataset draws at all; one that does not (a
        # TensorDataset, most datasets without augmentation) is read plainly from then on
        if self._draws is False:
            return [self.dataset[index] for index in indices]
        return apart(self._seeded, indices, self._draws is None)

    def _seeded(self, indices: Sequence[int], watch: bool = False) -> list[Any]:
        seed, epoch = self._state.tolist()
        if epoch != self._epoch_given:  # a persistent worker's copy, in a new epoch
            self._give_epoch(epoch)
        inner = _batched_reader(self.dataset)
        if inner is not None:  # your batched reader: one seed per batch, from its first sample
            seed_draws(sample_seed(seed, epoch, indices[0]))
            before = draw_positions() if watch else None
            samples = inner(indices)
            if before is not None:
                self._draws = drew_since(before)
            return samples
        samples, drew = [], False
        for index in indices:
            seed_draws(sample_seed(seed, epoch, index))
            before = draw_positions() if watch else None
            samples.append(self.dataset[index])
            drew = drew or (before is not None and drew_since(before))
        if watch:
            self._draws = drew
        return samples


def _batched_reader(dataset: Any) -> Any:
    """``dataset.__getitems__`` if its own class reads batches (torch's ``Subset`` and the
    like only forward to ``__getitem__``: those are read sample by sample, seeded each)."""
    method = getattr(type(dataset), "__getitems__", None)
    if method is None or getattr(method, "__module__", "").startswith("torch.utils.data"):
        return None
    return dataset.__getitems__
