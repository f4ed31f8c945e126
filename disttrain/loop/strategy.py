"""How the training step reaches the model: a value chosen once, the same loop for all.

- one process: ``training_step`` is called directly;
- ``ddp``: through DistributedDataParallel's forward (its hooks all-reduce gradients);
- ``fsdp``: through the FSDP2 root's ``__call__`` with the step as its forward for that one
  call (forward redirection), so the root's all-gather and reshard hooks run around it;
- ``hsdp``, and ``fsdp`` on a device mesh: the same, FSDP2 sharding over the mesh's data
  dimensions (``disttrain.dist.mesh``) after ``configure_model(mesh)`` applied any
  tensor-parallel plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from disttrain.config.options import TrainerConfig
from disttrain.data.transfer import carried, uncarried
from disttrain.dist.collectives import Collectives
from disttrain.dist.fsdp import no_gradient_sync, shard_fsdp, unsharded
from disttrain.loop.router import TrainingStep
from disttrain.loop.stopping import Stopping

# The oldest torch disttrain runs on, as pyproject.toml states it: FSDP2's ``fully_shard`` and
# ``MixedPrecisionPolicy`` became public in ``torch.distributed.fsdp`` in 2.6 (before, they
# lived in the private ``torch.distributed._composable.fsdp``).
MIN_TORCH = (2, 6)


def check_torch_version(strategy: str, version: str | None = None) -> None:
    """A clear error for ``strategy="fsdp"`` on a torch older than ``MIN_TORCH``, instead of
    an ImportError from inside the sharding."""
    version = torch.__version__ if version is None else version
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if strategy in ("fsdp", "hsdp") and found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(
            f"strategy={strategy!r} needs torch>={need} (torch.distributed.fsdp.fully_shard); "
            f"this is torch {version}. Install torch>={need}, or use strategy='ddp'."
        )


class Step:
    """What the loop needs: ``forward(*args)`` for the training step, ``no_sync()`` for
    micro-steps inside an accumulation window, ``call(name)`` for evaluation steps."""

    def __init__(
        self, forward: Callable[..., Any], model: Any, module: torch.nn.Module, sharded: bool
    ) -> None:
        self.forward, self.model, self.module, self.sharded = forward, model, module, sharded

    def compiled(self) -> Callable[..., Any]:
        """``forward`` with the model compiled (after the DDP wrap, as PyTorch recommends);
        the hooks stay outside the compiled region."""
        if self.model is None:
            return torch.compile(self.forward)
        return _carrying(torch.compile(self.model))

    def no_sync(self) -> contextlib.AbstractContextManager:
        return no_gradient_sync(self.module) if self.sharded else self.model.no_sync()

    def call(self, name: str) -> Callable[..., Any]:
        method = getattr(self.module, name)
        return _redirected(self.module, method) if self.sharded else method

    def evaluating(self) -> contextlib.AbstractContextManager:
        """The context of one evaluation loop: under FSDP, the whole module unsharded for it.

        Evaluation shards are unpadded (each sample once), so ranks may hold different numbers
        of batches. A sharded forward all-gathers per block per batch, and a rank with a batch
        more would wait in an all-gather its peers never join. Gathering every block once
        before the loop (the same collectives, in the same order, on every rank) and keeping
        it gathered until the loop ends leaves no collective per batch. The price is the
        whole module's parameters (in the compute dtype) during evaluation.
        """
        return unsharded(self.module) if self.sharded else contextlib.nullcontext()


def build(
    cfg: TrainerConfig,
    collectives: Collectives,
    device: torch.device,
    module: Any,
    configure: Callable[[], tuple],
    stopping: Stopping,
    data_mesh: Any = None,
) -> tuple[Step, tuple]:
    """Wrap ``module`` as ``cfg.strategy`` says and build the optimizers with
    ``configure()``: after sharding for FSDP and HSDP (they must see the sharded parameters),
    before the wrap for DDP (whose ``find_unused_parameters`` depends on how many there are).
    FSDP2 shards over ``data_mesh`` (None: every rank). One process (no process group) runs
    the module as it is."""
    check_torch_version(cfg.strategy)
    if cfg.strategy in ("fsdp", "hsdp") and collectives.backend != "none":
        blocks = module.fsdp_blocks() if hasattr(module, "fsdp_blocks") else _default_blocks(module)
        shard_fsdp(module, blocks, cfg.precision, cfg.activation_checkpointing, data_mesh)
        step = Step(_redirected(module, module.training_step), None, module, sharded=True)
        return step, configure()
    configured = configure()
    optimizers = configured[0]
    router = TrainingStep(module)
    find_unused = cfg.find_unused_parameters
    stopping.attach_vote(router, device)  # before the wrap: DDP must see it
    model = collectives.wrap(
        router,
        device,
        find_unused=len(optimizers) > 1 if find_unused is None else find_unused,
    )
    # unwrapped (one process), call training_step itself: the router adds nothing there
    forward = module.training_step if model is router else _carrying(model)
    return Step(forward, model, module, sharded=False), configured


def _carrying(model: Callable[..., Any]) -> Callable[..., Any]:
    """Call ``model`` (DDP) with the step's arguments carried through its input re-packing
    untouched (``disttrain.transfer.Carried``): the batch types transfer promises survive
    the CUDA path, where DDP rebuilds every container it finds."""

    def forward(*args: Any) -> Any:
        return model(*carried(args))

    return forward


def _default_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every direct child that holds parameters: the usual unit of sharding."""
    return [child for child in module.children() if any(True for _ in child.parameters())]


def _redirected(module: torch.nn.Module, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        def forward(*inner: Any) -> Any:
            del module.forward  # inside the step, self(x) is the module's own forward again
            return method(*uncarried(inner))

        module.forward = forward
        try:
            return module(*carried(args))  # the root's input re-packing leaves it alone
        finally:
            module.__dict__.pop("forward", None)

    return call
