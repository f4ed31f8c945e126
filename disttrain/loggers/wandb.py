"""``WandbLogger``: a Weights & Biases run (``pip install 'disttrain[wandb]'``), online or
offline, its files under ``RUN_DIR/wandb``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from disttrain.loggers.core import Logger
from disttrain.loggers.run_ids import read_run_file, write_run_file

log = logging.getLogger("disttrain.loggers")
RUN_FILE = "wandb-run.yaml"  # in save_dir: the run a resumed fit goes on logging into
STEP_KEY = "trainer/global_step"  # every metric's x axis


class WandbLogger(Logger):
    """Log to W&B (``experiment`` is the ``wandb`` Run, started on first use on global rank 0
    only). ``offline=True`` (or ``mode="offline"``) writes the run to ``SAVE_DIR/wandb`` for
    ``wandb sync`` and needs no network or account.

    Metrics are logged with the optimizer step as ``trainer/global_step``, each metric's x
    axis (as Lightning does), so steps trained again after a resume never clash with W&B's
    own step counter. The run's id goes into ``SAVE_DIR/wandb-run.yaml``; a resumed fit
    (``resume``) continues that run (``wandb.init(id=..., resume="allow")``), a fresh fit
    starts a new one; ``id`` names a run to log into instead. Any other keyword (``entity``,
    ``tags``, ``group``, ``settings``, ...) goes to ``wandb.init`` as given.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        save_dir: str | Path | None = None,
        id: str | None = None,  # wandb.init's own name for it
        offline: bool = False,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(save_dir)
        self.project, self.run_name, self._given_id = project, name, id
        if offline:
            init_kwargs["mode"] = "offline"
        self._init_kwargs = init_kwargs
        self._id: str | None = id  # the run logged into, once known
        self._fresh = False  # resume_from(None): a new run, whatever the run file says
        self._run: Any = None

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def log_dir(self) -> Path | None:
        return None if self.save_dir is None else self.save_dir / "wandb"

    @property
    def run_id(self) -> str | None:
        """The run's id once it is started (or given)."""
        return self._id

    @property
    def experiment(self) -> Any:
        if self._run is None:
            self._run = self._start()
        return self._run

    def resume_from(self, step: int | None) -> None:
        if self._given_id is None and self._run is None:
            self._id, self._fresh = None, step is None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.experiment.log({**metrics, STEP_KEY: step})

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.experiment.config.update(params, allow_val_change=True)

    def finalize(self, status: str = "success") -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if status == "success" else 1)
            self._run = None  # a later log (validate, test) resumes the same id

    def _start(self) -> Any:
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "WandbLogger needs the wandb package: pip install 'disttrain[wandb]'"
            ) from err
        if self.save_dir is None:
            raise RuntimeError("WandbLogger: no save_dir and no run directory")
        run_file = self.save_dir / RUN_FILE
        if self._id is None and not self._fresh:
            self._id = read_run_file(run_file).get("id")
        self.save_dir.mkdir(parents=True, exist_ok=True)  # else wandb falls back to /tmp
        kwargs: dict[str, Any] = {"resume": "allow"} if self._id else {}
        run = wandb.init(
            project=self.project,
            name=self.run_name,
            dir=str(self.save_dir),
            id=self._id,
            **kwargs,
            **self._init_kwargs,
        )
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        self._id, self._fresh = run.id, False
        write_run_file(run_file, {"id": run.id, "project": run.project})
        return run
