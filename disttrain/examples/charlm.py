"""A character-level transformer language model on the help texts that ship with Python.

The corpus is ``pydoc_data.topics`` (the text behind ``help('topic')``, about 465 kB): real
English prose and code, on every machine, no download. ``prepare_data`` tokenises it once into
the run's data folder; ``setup`` loads it on every rank and builds the layers whose size
depends on the vocabulary, as the seed's ``setup`` example does.

The corpus is cut in three consecutive parts: the first 90% trains, the next 5% validates and
the last 5% is the test split that ``Trainer.test`` (``disttrain test``) evaluates. It logs
``train_loss`` and ``lr`` per step, ``val_loss`` per validation loop and ``test_loss`` per test
run, all in nats per character and exact over the ranks.

Run it alone (debug mode) or under torchrun::

    python -m disttrain.examples.charlm
    torchrun --nproc-per-node 2 -m disttrain.examples.charlm
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import disttrain

log = logging.getLogger("disttrain.examples.charlm")


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def split(
    ids: torch.Tensor, val_fraction: float, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The corpus cut in three consecutive parts: train, validation, test."""
    held_out = val_fraction + test_fraction  # 0.1: the 90% trained before
    train_end = int(len(ids) * (1 - held_out))
    val_end = train_end + int(len(ids) * val_fraction)
    return ids[:train_end], ids[train_end:val_end], ids[val_end:]


class Windows(Dataset):
    """Non-overlapping windows of ``block + 1`` token ids: input and next-token target."""

    def __init__(self, ids: torch.Tensor, block: int) -> None:
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int):
        chunk = self.ids[i * self.block : i * self.block + self.block + 1].long()
        return chunk[:-1], chunk[1:]


class CharLM(disttrain.Module):
    def __init__(
        self,
        data_dir: str | None = None,
        block_size: int = 64,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        dropout: float = 0.0,
        batch_size: int = 32,
        lr: float = 3e-3,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        sample_chars: int = 200,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.block_size, self.n_embd, self.n_layer, self.n_head = (
            block_size,
            n_embd,
            n_layer,
            n_head,
        )
        self.dropout, self.batch_size, self.lr = dropout, batch_size, lr
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.sample_chars = sample_chars
        self.val_history: list[float] = []
        self.baseline = math.nan
        self.sample = ""

    # -- data -----------------------------------------------------------------------------
    def _cache(self) -> Path:
        root = self.data_dir or os.path.join(self.trainer.config.default_root_dir, "data")
        return Path(root) / "charlm-pydoc-topics.pt"

    def prepare_data(self) -> None:
        cache = self._cache()
        if cache.exists():
            return
        text = corpus_text()
        vocab = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.uint8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"vocab": vocab, "ids": ids}, tmp)
        os.replace(tmp, cache)  # atomic: a reader never sees half a file

    def setup(self, stage: str) -> None:
        cached = torch.load(self._cache(), weights_only=True)
        self.vocab = cached["vocab"]
        self.train_ids, self.val_ids, self.test_ids = split(
            cached["ids"], self.val_fraction, self.test_fraction
        )
        counts = torch.bincount(self.train_ids.long(), minlength=len(self.vocab)).double()
        p = counts[counts > 0] / counts.sum()
        self.baseline = float(-(p * p.log()).sum())  # unigram cross-entropy, nats per char
        if not hasattr(self, "blocks"):
            self._build(len(self.vocab))

    def _build(self, vocab_size: int) -> None:
        self.tok = nn.Embedding(vocab_size, self.n_embd)
        self.pos = nn.Embedding(self.block_size, self.n_embd)
        layer = nn.TransformerEncoderLayer(
            self.n_embd,
            self.n_head,
            4 * self.n_embd,
            self.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, self.n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(self.n_embd)
        self.head = nn.Linear(self.n_embd, vocab_size)

    def train_dataloader(self):
        data = Windows(self.train_ids, self.block_size)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(Windows(self.val_ids, self.block_size), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(Windows(self.test_ids, self.block_size), batch_size=self.batch_size)

    # -- model ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))

    def _loss(self, batch, reduction="mean"):
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction=reduction
        )

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        loss_sum = self._loss(batch, "sum")
        return torch.stack(
            [loss_sum, torch.tensor(float(batch[1].numel()), device=loss_sum.device)]
        )

    test_step = validation_step

    def validation_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "val")

    def test_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "test")

    def _evaluation_end(self, outputs: list[torch.Tensor], stage: str) -> dict[str, float]:
        # a rank without batches still joins the all_reduce, with zeros on the module's device
        totals = torch.stack(outputs).sum(0) if outputs else torch.zeros(2, device=self.device)
        loss_sum, count = self.trainer.all_reduce(totals.double()).tolist()
        loss = loss_sum / count  # exact: every character of the split counted once
        if self.trainer.sanity_checking:
            return {f"{stage}_loss": loss}
        if stage == "val":
            self.val_history.append(loss)
        where = f"epoch {self.current_epoch}  step {self.global_step}  " if stage == "val" else ""
        log.info(
            "%s%s_loss %.4f nats/char  (unigram baseline %.4f)", where, stage, loss, self.baseline
        )
        # every rank holds the same reduced value: "max" passes it on unchanged
        self.log(f"{stage}_loss", loss, reduce="max", prog_bar=True)
        return {f"{stage}_loss": loss}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

    def on_fit_end(self) -> None:
        self.sample = self.generate("The ", self.sample_chars)
        log.info("sample:\n%s", self.sample)

    @torch.no_grad()
    def generate(self, prompt: str, n: int, temperature: float = 0.8, seed: int = 0) -> str:
        was_training = self.training
        self.eval()
        index = {ch: i for i, ch in enumerate(self.vocab)}
        ids = torch.tensor([[index.get(ch, 0) for ch in prompt]], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for _ in range(n):
            logits = self(ids[:, -self.block_size :])[:, -1].float() / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
        self.train(was_training)
        return "".join(self.vocab[i] for i in ids[0].tolist())


if __name__ == "__main__":
    disttrain.seed_everything(0)
    disttrain.Trainer(max_epochs=3, default_root_dir="runs/charlm").fit(CharLM())
