"""The MLflow side: one experiment per study, one parent run per study, one nested child run per trial.

The driver creates the experiment and every run (no races between trials); workers only log params and
batched step metrics to the child run they were handed.
"""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path
from typing import Any

from .errors import UserError

ROLE, STUDY, TRIAL_NUMBER, STATE, REASON, PRUNED_AT = (
    "ssa_tune.role", "ssa_tune.study", "ssa_tune.trial_number", "ssa_tune.state", "ssa_tune.fail_reason",
    "ssa_tune.pruned_at_step")
PARENT = "mlflow.parentRunId"
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def default_tracking(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def check_tracking(uri: str) -> None:
    """Reach an MLflow server once so a wrong URI is reported before anything is written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except Exception as e:
            raise UserError(f"cannot reach MLflow tracking server {uri}: {getattr(e, 'reason', e)}", field="tracking") from None
    elif not uri.startswith(("sqlite:///", "postgresql", "mysql", "databricks")):
        raise UserError(f"unsupported tracking URI {uri!r} (use sqlite:///PATH, a database URL or http(s)://)",
                        field="tracking")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """SQLite-backed stores can answer 'database is locked' under concurrent writers: retry briefly."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def _str(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class Tracker:
    """Driver-side handle on the study's experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial tables" INFO lines

        self.uri = uri
        self.client = _client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if artifact_root is not None and not uri.startswith(("http://", "https://")):
                location = (artifact_root / experiment).resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # created meanwhile by another driver
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        self._enable_wal()

    def _enable_wal(self) -> None:
        if self.uri.startswith("sqlite:///"):
            import sqlite3

            with sqlite3.connect(self.uri[len("sqlite:///"):]) as con:
                con.execute("PRAGMA journal_mode=WAL")

    def parent_run(self, study: str, run_id: str | None, tags: dict[str, str]) -> str:
        """The study's parent run: reopened when it exists (resume), created otherwise."""
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:
                pass
        run = self.client.create_run(self.experiment_id, run_name=study,
                                     tags={ROLE: "study", STUDY: study, **tags})
        return run.info.run_id

    def child_run(self, parent_id: str, study: str, number: int | None, params: dict[str, Any],
                  role: str = "trial", tags: dict[str, Any] | None = None, name: str | None = None) -> str:
        from mlflow.entities import Param

        all_tags = {PARENT: parent_id, ROLE: role, STUDY: study, STATE: "RUNNING",
                    **{k: str(v) for k, v in (tags or {}).items()}}
        if number is not None:
            all_tags[TRIAL_NUMBER] = str(number)
        run = _retry(self.client.create_run, self.experiment_id, run_name=name or f"trial-{number}", tags=all_tags)
        items = [Param(k, _str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def finish_trial(self, run_id: str, state: str, reason: str | None = None, pruned_at: int | None = None,
                     status: str | None = None) -> None:
        """Tag the run with its Optuna state (and why) and close it; `status` overrides the MLflow status."""
        from mlflow.entities import RunTag

        tags = {STATE: state}
        if reason:
            tags[REASON] = reason[:5000]
        if pruned_at is not None:
            tags[PRUNED_AT] = str(pruned_at)
        _retry(self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        _retry(self.client.set_terminated, run_id, status or _STATUS.get(state, "FAILED"))

    def log_study(self, run_id: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  metrics: dict[str, float] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        items = [Param(k, _str(v)) for k, v in sorted((params or {}).items())]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, _str(v)) for k, v in tags.items()])
        if metrics:
            log_metrics(self.uri, run_id, metrics, step=None, client=self.client)

    def finish_study(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def kill_runs(self, run_ids: list[str], reason: str) -> None:
        for rid in run_ids:
            try:
                run = self.client.get_run(rid)
            except Exception:
                continue
            if run.info.status == "RUNNING":
                self.finish_trial(rid, "FAIL", reason, status="KILLED")


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None, client=None) -> None:
    """Batched writes of the finite numeric metrics (non-numbers and NaN/inf are left out)."""
    from mlflow.entities import Metric

    client = client or _client(uri)
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(items), 500):
        _retry(client.log_batch, run_id, metrics=items[i:i + 500])
