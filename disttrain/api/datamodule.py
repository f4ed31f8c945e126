"""``disttrain.DataModule``: a run's data, kept apart from the model."""

from __future__ import annotations

from typing import Any


class DataModule:
    """Dataloaders and their preparation, for ``Trainer.fit(module, datamodule=...)``.

    Where a data module defines a ``*_dataloader``, the trainer uses it instead of the
    module's. Its ``prepare_data``, ``setup`` and ``teardown`` follow the same rank rules as
    the module's hooks of those names (see :class:`disttrain.ModelHooks`) and run just before
    them: ``prepare_data`` on global rank 0 only (local rank 0 per node with
    ``prepare_data_per_node``) and without assigning state; the others on every rank.
    """

    def prepare_data(self) -> None:
        """Download or preprocess once; global zero only, no collectives, no state."""

    def setup(self, stage: str) -> None:
        """Load what ``prepare_data`` made, on every rank."""

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` made, on every rank."""

    def train_dataloader(self) -> Any:
        return None

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        return None

    def predict_dataloader(self) -> Any:
        return None


def given_loaders(train: Any = None, val: Any = None) -> DataModule:
    """The loaders handed to ``Trainer.fit(module, train_dataloaders=..., val_dataloaders=...)``
    as a data module: each one given replaces the module's, the others stay the module's (the
    trainer asks a data module for the loaders its class defines)."""
    methods: dict[str, Any] = {}
    if train is not None:
        methods["train_dataloader"] = lambda self: train
    if val is not None:
        methods["val_dataloader"] = lambda self: val
    return type("GivenLoaders", (DataModule,), methods)()
