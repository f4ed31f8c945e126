"""torchdata's StatefulDataLoader against disttrain's own resume, on the case issue 13 names:
random augmentation drawn in 2 loader workers (``torch.randn`` in ``__getitem__``), a
mid-epoch resume after 3 batches. Prints whether each gives the unbroken epoch's batches.

    pip install --no-deps torchdata      # pure Python; --no-deps keeps your torch
    python benchmarks/torchdata_comparison.py

Measured here (torchdata 0.11.0, torch 2.13 CPU): StatefulDataLoader restores the sample
order but not the augmentation (the workers start from new seeds; its docs ask the dataset
for ``state_dict``/``load_state_dict`` of its RNG); disttrain gives both, and the same
augmentation with any worker count or world size (README: Exact resume with loader workers).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from disttrain.data.loaders import epoch_batches, train_loader

STOP = 3  # batches trained before the checkpoint


class Augmented(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.randn(1).item()])  # (index, augmentation)


def verdict(full: list, first: list, rest: list) -> str:
    order = [b[:, 0].tolist() for b in full] == [b[:, 0].tolist() for b in first + rest]
    exact = len(full) == len(first + rest) and all(
        torch.equal(a, b) for a, b in zip(full, first + rest)
    )
    kept, same = "kept" if order else "LOST", "exact" if exact else "DIFFERENT"
    return f"sample order {kept}, augmentation {same}"


def torchdata() -> str:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return "not installed (pip install --no-deps torchdata)"

    def make():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        return StatefulDataLoader(
            Augmented(), batch_size=2, shuffle=True, num_workers=2, generator=gen
        )

    full = list(make())
    loader = make()
    it = iter(loader)
    first = [next(it) for _ in range(STOP)]
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    return verdict(full, first, list(resumed))


def disttrain() -> str:
    def make():
        torch.manual_seed(0)
        loader = DataLoader(Augmented(), batch_size=2, shuffle=True, num_workers=2)
        return train_loader(loader, 0, 1, 1, "Augmented")

    with epoch_batches(make(), 0, 0) as batches:
        full = list(batches)
    first = full[:STOP]  # a checkpoint after 3 batches; the resumed run starts at batch 3
    with epoch_batches(make(), 0, STOP) as batches:
        return verdict(full, first, list(batches))


if __name__ == "__main__":
    print(f"torchdata StatefulDataLoader: {torchdata()}")
    print(f"disttrain:                    {disttrain()}")
