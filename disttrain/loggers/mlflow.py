"""``MLflowLogger``: params and per-step metrics in an MLflow run (``pip install
'disttrain[mlflow]'``), by default in a file store under the run directory."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from disttrain.loggers.core import Logger, flatten
from disttrain.loggers.run_ids import read_run_file, write_run_file

log = logging.getLogger("disttrain.loggers")
RUN_FILE = "mlflow-run.yaml"  # in save_dir: the run a resumed fit goes on logging into
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")  # MLflow's metric and param names
_PARAM_LENGTH = 6000  # MLflow's limit on a param's value


class MLflowLogger(Logger):
    """Log to MLflow through its client (``experiment`` is the ``MlflowClient``).

    ``tracking_uri`` defaults to a file store in ``SAVE_DIR/mlruns`` (``SAVE_DIR``: the run
    directory unless ``save_dir`` is given; read it back with
    ``MlflowClient(tracking_uri=logger.tracking_uri)`` or ``mlflow ui --backend-store-uri
    ...``). MLflow 3 keeps its file store in maintenance mode behind
    ``MLFLOW_ALLOW_FILE_STORE=true``: the logger sets it (unless you set it) when, and only
    when, it opens a ``file:`` store. Any other URI (``sqlite:///...``, ``http://...``) is
    used as given. The run is created on the first log, on global rank 0 only; its id goes
    into ``SAVE_DIR/mlflow-run.yaml``, and a resumed fit (``resume``) goes on logging into
    that run (a fresh fit starts a new one). ``run_id`` names a run to log into instead.
    Params are the flattened config (``trainer/max_epochs``); a resumed run keeps the params
    it has (MLflow cannot change them) and warns about the ones that changed.
    """

    def __init__(
        self,
        experiment_name: str = "disttrain",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        save_dir: str | Path | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        super().__init__(save_dir)
        self.experiment_name, self.run_name, self.tags = experiment_name, run_name, tags
        self._tracking_uri, self._given_run_id = tracking_uri, run_id
        self._run_id: str | None = run_id  # the run logged into, once known
        self._fresh = False  # resume_from(None): a new run, whatever the run file says
        self._client: Any = None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def tracking_uri(self) -> str:
        if self._tracking_uri is not None:
            return self._tracking_uri
        if self.save_dir is None:
            raise RuntimeError("MLflowLogger: no save_dir, tracking_uri or run directory")
        return (self.save_dir / "mlruns").resolve().as_uri()

    @property
    def log_dir(self) -> Path | None:
        if self._tracking_uri is None and self.save_dir is not None:
            return self.save_dir / "mlruns"
        return self.save_dir

    @property
    def run_id(self) -> str | None:
        """The run's id once it is open (or given)."""
        return self._run_id

    @property
    def experiment(self) -> Any:
        if self._client is None:
            self._client = self._open_client()
        if self._run_id is None:
            self._run_id = self._find_or_create_run()
            write_run_file(
                self._run_file(), {"run_id": self._run_id, "tracking_uri": self.tracking_uri}
            )
        return self._client

    def resume_from(self, step: int | None) -> None:
        if self._given_run_id is None:
            self._run_id, self._fresh = None, step is None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client = self.experiment
        now = int(time.time() * 1000)
        batch = [Metric(_clean(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            client.log_batch(self._run_id, metrics=batch[i : i + 1000])

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        client = self.experiment
        have = client.get_run(self._run_id).data.params
        new = {_clean(k): str(v)[:_PARAM_LENGTH] for k, v in flatten(params).items()}
        changed = sorted(k for k, v in new.items() if k in have and have[k] != v)
        if changed:
            log.warning(
                "MLflowLogger: run %s keeps its params; these changed and are not logged: %s",
                self._run_id,
                ", ".join(changed),
            )
        batch = [Param(k, v) for k, v in new.items() if k not in have]
        for i in range(0, len(batch), 100):  # MLflow's limit per batch
            client.log_batch(self._run_id, params=batch[i : i + 100])

    def finalize(self, status: str = "success") -> None:
        if self._client is None or self._run_id is None:
            return
        state = {"success": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self._client.set_terminated(self._run_id, state)
        log.info("mlflow: run %s in %s", self._run_id, self.tracking_uri)

    def _run_file(self) -> Path:
        if self.save_dir is None:
            raise RuntimeError("MLflowLogger: no save_dir and no run directory")
        return self.save_dir / RUN_FILE

    def _open_client(self) -> Any:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ImportError(
                "MLflowLogger needs the mlflow package: pip install 'disttrain[mlflow]'"
            ) from err
        if self.tracking_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MlflowClient(tracking_uri=self.tracking_uri)

    def _find_or_create_run(self) -> str:
        """The run named in the run file (unless a fresh fit), reopened; else a new run."""
        from mlflow.exceptions import MlflowException

        client = self._client
        saved = {} if self._fresh else read_run_file(self._run_file())
        if saved.get("run_id") and saved.get("tracking_uri") == self.tracking_uri:
            try:
                client.update_run(saved["run_id"], status="RUNNING")
                return str(saved["run_id"])
            except MlflowException as err:
                log.warning("MLflowLogger: run %s not found (%s): new run", saved["run_id"], err)
        found = client.get_experiment_by_name(self.experiment_name)
        experiment_id = (
            found.experiment_id if found else client.create_experiment(self.experiment_name)
        )
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        return str(run.info.run_id)


def _clean(key: str) -> str:
    return _NOT_ALLOWED.sub("_", str(key))
