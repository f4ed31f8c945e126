"""The debug mode (no torchrun): batch transfer, precision, options, clipping, module state."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from common import IndexedData, Regressor, StatefulPrepare, TwoHeads

import disttrain
from disttrain import ConfigError, HookFailed, Trainer
from disttrain.data.transfer import move_to_device

Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor
    meta: dict
    name: str = "b"


class ToMarker:
    def __init__(self):
        self.moved_to = None

    def to(self, device):
        self.moved_to = device
        return self


def test_nested_batches_keep_their_types():
    marker = ToMarker()
    batch = {
        "pair": Pair(torch.ones(2), [torch.zeros(1), (torch.ones(1), "text")]),
        "dc": Batch(torch.arange(3), collections.OrderedDict(a=torch.ones(1))),
        "dd": collections.defaultdict(list, {"k": torch.ones(1)}),
        "custom": marker,
        "n": 3,
    }
    moved = move_to_device(batch, torch.device("meta"))
    assert type(moved["pair"]) is Pair and moved["pair"].left.device.type == "meta"
    assert isinstance(moved["pair"].right, list) and isinstance(moved["pair"].right[1], tuple)
    assert moved["pair"].right[1][1] == "text" and moved["pair"].right[1][0].is_meta
    assert type(moved["dc"]) is Batch and moved["dc"].tokens.is_meta and moved["dc"].name == "b"
    assert type(moved["dc"].meta) is collections.OrderedDict and moved["dc"].meta["a"].is_meta
    assert type(moved["dd"]) is collections.defaultdict and moved["dd"]["k"].is_meta
    assert marker.moved_to == torch.device("meta") and moved["n"] == 3
    assert batch["pair"].left.device.type == "cpu"  # the input is left as it was


def test_transfer_override_receives_batch_and_device():
    seen = []

    class Custom(Regressor):
        def transfer_batch_to_device(self, batch, device):
            seen.append((type(batch).__name__, device))
            return super().transfer_batch_to_device(batch, device)

    Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, limit_val_batches=0).fit(
        Custom()
    )
    assert seen == [("list", torch.device("cpu"))] * 2


def test_bf16_autocast_on_cpu():
    dtypes = []

    class Bf16(Regressor):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            out = self(x)
            dtypes.append(out.dtype)
            return torch.nn.functional.mse_loss(out.float(), y)

    module = Bf16()
    Trainer(
        max_epochs=1,
        limit_train_batches=2,
        precision="bf16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module)
    assert dtypes == [torch.bfloat16] * 2
    assert module.net[0].weight.dtype == torch.float32  # the weights stay in fp32


def test_fp16_mixed_uses_a_grad_scaler():
    raw, scaled = [], []

    class Fp16(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            raw.append(loss.item())
            return loss

        def backward(self, trainer, loss, optimizer, optimizer_idx):
            scaled.append(loss.item())
            loss.backward()

    Trainer(
        max_epochs=1,
        limit_train_batches=1,
        precision="16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
    ).fit(Fp16())
    assert scaled and scaled[0] == pytest.approx(raw[0] * 2**16)  # the GradScaler's first scale


def test_gradient_clipping_bounds_the_update():
    class Big(Regressor):
        def training_step(self, batch, batch_idx):
            return 1e6 * super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    disttrain.seed_everything(0)
    module = Big()
    before = torch.nn.utils.parameters_to_vector(module.parameters()).clone()
    Trainer(
        max_epochs=1,
        limit_train_batches=1,
        gradient_clip_val=0.5,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module)
    after = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(0.5, rel=1e-4)


def test_several_optimizers_call_order_and_optimizer_idx():
    calls = []

    class Order(TwoHeads):
        def training_step(self, batch, batch_idx, optimizer_idx):
            calls.append(("step", optimizer_idx))
            return super().training_step(batch, batch_idx, optimizer_idx)

        def backward(self, trainer, loss, optimizer, optimizer_idx):
            calls.append(("backward", optimizer_idx))
            assert optimizer is trainer.optimizers[optimizer_idx]
            loss.backward()

        def on_before_zero_grad(self, optimizer):
            calls.append(("zero", self.trainer.optimizers.index(optimizer)))

    Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(Order())
    micro = [("step", 0), ("backward", 0), ("step", 1), ("backward", 1)]
    assert calls == micro + micro + [("zero", 0), ("zero", 1)]


def test_module_properties_follow_the_trainer():
    module = Regressor()
    assert module.trainer is None and module.global_rank == 0 and module.world_size == 1
    trainer = Trainer(max_epochs=2, limit_train_batches=3, num_sanity_val_steps=0)
    trainer.fit(module)
    assert module.trainer is trainer and module.device == torch.device("cpu")
    assert module.current_epoch == 1 and module.global_step == 6
    with pytest.raises(AttributeError):
        module.global_step = 3


def test_prepare_data_must_not_assign_state_in_debug_mode():
    with pytest.raises(HookFailed, match=r"rank 0.*self\.vocab"):
        Trainer(max_epochs=1).fit(StatefulPrepare())


@pytest.mark.parametrize(
    "options, key",
    [
        ({"max_epoch": 3}, "max_epoch"),
        ({"max_epochs": "3"}, "max_epochs"),
        ({"max_epochs": True}, "max_epochs"),
        ({"precision": "fp8"}, "precision"),
        ({"limit_train_batches": 1.5}, "limit_train_batches"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"accelerator": "tpu"}, "accelerator"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_options_name_the_option(options, key):
    with pytest.raises(ConfigError) as err:
        Trainer(**options)
    assert err.value.key == key and key in str(err.value)


def test_unknown_option_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'max_epochs'"):
        Trainer(max_epoch=3)


def test_compile_keeps_every_hook_in_order_and_trains_the_same():
    from common import Recorder

    runs = {}
    for compiled in (False, True):
        disttrain.seed_everything(0)
        module = Recorder(n_train=8)
        Trainer(
            max_epochs=1, num_sanity_val_steps=0, compile=compiled, enable_checkpointing=False
        ).fit(module)
        runs[compiled] = (module.calls, {k: v.clone() for k, v in module.state_dict().items()})
    assert runs[True][0] == runs[False][0]
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-5)


def test_validate_and_test_evaluate_a_checkpoint_with_resume(tmp_path):
    from common import LogsMetrics

    disttrain.seed_everything(0)
    trained = LogsMetrics(n_val=7)
    fit = Trainer(max_epochs=2, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    fit.fit(trained)
    after_fit = fit.callback_metrics["val_mse"]
    fresh = LogsMetrics(n_val=7)  # other weights
    untrained = Trainer(default_root_dir=str(tmp_path / "other"))
    untrained.validate(fresh)
    assert untrained.callback_metrics["val_mse"] != pytest.approx(after_fit)
    evaluator = Trainer(default_root_dir=str(tmp_path), resume="auto")
    evaluator.validate(fresh)
    assert evaluator.callback_metrics["val_mse"] == pytest.approx(after_fit, rel=1e-6)


class SeesItsSamplersEpoch(Regressor):
    """Its own DistributedSampler: on_epoch_start reads the epoch the sampler was given."""

    def __init__(self):
        super().__init__(n_train=8)
        self.seen_in_hook: list[tuple[int, int]] = []

    def train_dataloader(self):
        data = IndexedData(self.n_train)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0)
        self.sampler = sampler
        return torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)

    def on_epoch_start(self):
        self.seen_in_hook.append((self.current_epoch, self.sampler.epoch))


def test_on_epoch_start_runs_after_the_samplers_set_epoch(tmp_path):
    module = SeesItsSamplersEpoch()
    disttrain.Trainer(max_epochs=3, default_root_dir=str(tmp_path)).fit(module)
    assert module.seen_in_hook == [(0, 0), (1, 1), (2, 2)]
