"""The MLflow side: one experiment per study, one parent run per study, one nested child run per trial.

The driver owns every write. Workers report their evaluations to the driver through Ray Tune, and the
driver mirrors them to MLflow through one queue and one thread (`Mirror`): a tracking server that is down
for a while delays the mirror instead of failing trials, and what could not be delivered when the driver
ends is kept in the Optuna study (`ssa-tune status` names it, `ssa-tune sync` sends it).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .redact import redact

ROLE, STUDY, TRIAL_NUMBER, STATE, REASON, PRUNED_AT, ARM, NODE_ID, NODE_IP = (
    "ssa_tune.role", "ssa_tune.study", "ssa_tune.trial_number", "ssa_tune.state", "ssa_tune.fail_reason",
    "ssa_tune.pruned_at_step", "ssa_tune.arm", "ssa_tune.node_id", "ssa_tune.node_ip")
PARENT = "mlflow.parentRunId"
CREATE_ID = "ssa_tune.create_id"  # one create of a child run, however often it is tried
_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

# MLflow's REST client retries a request for minutes by default; the mirror's queue does the waiting instead,
# and its "View run at" lines would interleave with the study's own output
_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _quiet_mlflow() -> None:
    for k, v in _MLFLOW_ENV.items():
        os.environ.setdefault(k, v)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial tables" INFO lines


def default_tracking(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking(uri: str) -> None:
    """Reach an MLflow server once (or open a database store) so a wrong URI is reported before anything
    is written."""
    if is_server(uri):
        import requests  # (MLflow's own HTTP client; it sends user:password@ in the URL as basic auth)

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except Exception as e:
            reason = type(e).__name__ if isinstance(e, requests.ConnectionError) else str(e).splitlines()[0]
            raise UserError(f"cannot reach MLflow tracking server {redact(uri)}: {reason}", field="tracking") from None
    elif uri.startswith("sqlite:///"):
        import sqlite3

        path = Path(uri[len("sqlite:///"):])
        if path.exists():
            try:
                with sqlite3.connect(path) as con:
                    con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            except sqlite3.DatabaseError as e:
                raise UserError(f"{path}: not a readable MLflow database ({e})", field="tracking") from None
    elif not uri.startswith(("postgresql", "mysql", "databricks")):
        raise UserError(f"unsupported tracking URI {uri!r} (use sqlite:///PATH, a database URL or http(s)://)",
                        field="tracking")


def experiment_url(uri: str, experiment_id: str) -> str | None:
    """Where the runs table of a study is in the MLflow UI (only a tracking server has one to link)."""
    return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs" if is_server(uri) else None


def _client(uri: str):
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets its own level when first imported
    return MlflowClient(tracking_uri=uri)


TRANSIENT, SERVER_ERROR, PERMANENT = "transient", "server error", "permanent"
# HTTP statuses of a server that is away or busy: the same write succeeds later
_BUSY_STATUS = {408, 429, 502, 503, 504}
# what MLflow's REST client says when it could not reach the server at all: it wraps the `requests` error
# (ConnectionError, Timeout) in an MlflowException whose status is 500, so only its text tells the two apart
_UNREACHABLE = ("max retries exceeded", "failed to establish a new connection", "connection refused",
                "connection aborted", "connection reset", "read timed out", "remotedisconnected")


def classify(e: BaseException) -> str:
    """How an MLflow write failed, by the exception's type and HTTP status:
    TRANSIENT (the server or the database is away or busy: retry until it is back), SERVER_ERROR (an HTTP
    500 from a server that answered: maybe a passing fault, maybe this write's own; retried a bounded number of
    times), PERMANENT (the server refused this write, e.g. a 4xx, or it can never apply: retrying cannot help)."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, (ConnectionError, TimeoutError)):
        return TRANSIENT
    if isinstance(e, MlflowException):
        text = str(e).lower()
        if any(s in text for s in _UNREACHABLE) or "database is locked" in text:
            return TRANSIENT
        status = e.get_http_status_code()
        if status in _BUSY_STATUS:
            return TRANSIENT
        return SERVER_ERROR if status >= 500 else PERMANENT
    if isinstance(e, OSError):  # requests' errors are OSErrors: the connection, not the write
        return TRANSIENT
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - mlflow depends on sqlalchemy
        OperationalError = ()
    if isinstance(e, OperationalError) and "locked" in str(e).lower():  # SQLite busy: another writer
        return TRANSIENT
    return PERMANENT


def transient(e: BaseException) -> bool:
    """An MLflow failure worth retrying soon (used by the short retries of direct writes)."""
    return classify(e) in (TRANSIENT, SERVER_ERROR)


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """Short retries for writes made directly (set-up, reports); the mirror retries for much longer."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not transient(e) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def _str(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _schema_template() -> Path:
    """An empty MLflow SQLite database of the installed MLflow version, made once per machine: MLflow builds a
    new database by running all of its schema migrations (seconds), a copy takes milliseconds."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssa-tune"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{template.name}.{os.getpid()}"
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates and migrates the schema
        tmp.replace(template)
    return template


def _new_sqlite_store(uri: str) -> None:
    path = Path(uri[len("sqlite:///"):])
    if path.exists():
        return
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    shutil.copyfile(_schema_template(), tmp)
    try:
        os.link(tmp, path)  # atomic, and never over a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class Tracker:
    """Driver-side handle on the study's experiment (created here, once, never by trials)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        if uri.startswith("sqlite:///"):
            _quiet_mlflow()
            _new_sqlite_store(uri)
        self.client = _client(uri)
        import mlflow

        try:
            exp = _retry(self.client.get_experiment_by_name, experiment)
            if exp is None:
                location = None
                if artifact_root is not None and not is_server(uri):
                    location = (artifact_root / experiment).resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:  # created meanwhile by another driver
                    self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self.experiment_id = exp.experiment_id
        except UserError:
            raise
        except Exception as e:  # a corrupt or foreign database, an incompatible schema
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot use the MLflow store {redact(uri)}: {first}", field="tracking") from None
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
        run = _retry(self.client.create_run, self.experiment_id, run_name=study,
                     tags={ROLE: "study", STUDY: study, **tags})
        return run.info.run_id

    def create_child(self, parent_id: str, study: str, name: str, params: dict[str, Any],
                     tags: dict[str, Any], create_id: str | None = None, look_first: bool = False) -> str:
        """A child run of the study's run. `create_id` tags it, so that a create tried again after a failure
        (`look_first`) finds the run an earlier try made (the server committed it, its answer was lost: the
        server stopped, the connection dropped) instead of making a second run that stays RUNNING forever."""
        from mlflow.entities import Param

        run_id = None
        if create_id and look_first:
            found = self.client.search_runs([self.experiment_id], f"tags.`{CREATE_ID}` = '{create_id}'",
                                            max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            all_tags = {PARENT: parent_id, STUDY: study, STATE: "RUNNING", **{k: str(v) for k, v in tags.items()}}
            if create_id:
                all_tags[CREATE_ID] = create_id
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        items = [Param(k, _str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # (logging a param again with its value is allowed)
            self.client.log_batch(run_id, params=items[i:i + 100])
        return run_id

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, state: str, reason: str | None = None, pruned_at: int | None = None,
               status: str | None = None) -> None:
        """Tag the run with its Optuna state (and why) and close it; `status` overrides the MLflow status."""
        tags: dict[str, Any] = {STATE: state}
        if reason:
            tags[REASON] = reason[:5000]
        if pruned_at is not None:
            tags[PRUNED_AT] = str(pruned_at)
        self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status or _STATUS.get(state, "FAILED"))

    def log_study(self, run_id: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                  metrics: dict[str, float] | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(k, _str(v)) for k, v in sorted((params or {}).items())]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        if tags:
            self.set_tags(run_id, tags)
        if metrics:
            log_metrics(self.client, run_id, metrics, step=None)


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int | None) -> None:
    """Batched writes of the finite numeric metrics (non-numbers and NaN/inf are left out)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


# -------------------------------------------------------------------------------------------- the mirror


def _public(op: dict) -> dict:
    """An operation as it is kept for `sync` (the mirror's own bookkeeping keys left out)."""
    return {k: v for k, v in op.items() if k not in ("_attempts", "_tried")}


class Mirror:
    """Every MLflow write of a driver, in order, on one thread, retried while the tracking server is away.

    Operations are keyed by the run they belong to ("trial-12", "robust-trial-3-main-s10000", "study"):

        create(key, name, params, tags)   -> the child run (its id goes to `on_created(key, run_id)`)
        metrics(key, metrics, step)        -> step metrics in batches
        tags(key, tags)                    -> tags
        finish(key, state, reason, ...)    -> closes the run

    An operation that fails with a transient error (server down, SQLite locked) is retried with backoff, and
    everything behind it waits: nothing is reordered. A server error (HTTP 500) is retried `max_attempts`
    times; then, like a permanent error (a write the server refuses), the operation is set aside and the
    queue goes on: one bad write never stalls the rest. `close(deadline)` waits for the queue; what is set
    aside or still undelivered then goes to `on_undelivered(key, ops)` so the caller can keep it (the Optuna
    study) for `ssa-tune status` to report and `ssa-tune sync` to send again.
    """

    def __init__(self, tracker: Tracker, parent_id: str, study: str,
                 on_created: Callable[[str, str], None] | None = None,
                 on_undelivered: Callable[[str, list[dict]], None] | None = None,
                 runs: dict[str, str] | None = None, max_backoff_s: float = 10.0, max_attempts: int = 5):
        self.tracker, self.parent_id, self.study = tracker, parent_id, study
        self.on_created, self.on_undelivered = on_created, on_undelivered
        self.runs: dict[str, str] = dict(runs or {})  # key -> MLflow run id
        self.max_backoff_s, self.max_attempts = max_backoff_s, max_attempts
        self.set_aside: list[dict] = []  # writes that failed for good: kept for `sync`, never dropped
        self._q: "queue.Queue[dict | None]" = queue.Queue()
        self._pending: list[dict] = []  # taken from the queue, not yet delivered
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.delivered = 0
        self.failures = 0  # transient failures seen (the server was away)
        self.dropped: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="ssa-tune-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ what the driver calls

    def create(self, key: str, name: str, params: dict[str, Any], tags: dict[str, Any]) -> None:
        self._put({"op": "create", "key": key, "name": name, "params": params, "tags": tags,
                   "create_id": uuid.uuid4().hex})

    def metrics(self, key: str, metrics: dict[str, Any], step: int | None) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self._put({"op": "metrics", "key": key, "metrics": clean, "step": step})

    def tags(self, key: str, tags: dict[str, Any]) -> None:
        self._put({"op": "tags", "key": key, "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, key: str, state: str, reason: str | None = None, pruned_at: int | None = None,
               status: str | None = None) -> None:
        self._put({"op": "finish", "key": key, "state": state, "reason": reason, "pruned_at": pruned_at,
                   "status": status})

    def end(self, key: str, status: str = "FINISHED") -> None:
        """Close a run without the trial tags (the study's parent run)."""
        self._put({"op": "end", "key": key, "status": status})

    def replay(self, ops: list[dict]) -> None:
        for op in ops:  # an earlier driver may have reached the server with these: a create looks first
            self._put({**op, "_tried": True})

    def close(self, timeout: float = 60.0) -> dict[str, list[dict]]:
        """Wait up to `timeout` for the queue to drain; returns {key: undelivered ops} (also handed to
        on_undelivered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not self._q.empty() or self._pending):
            time.sleep(0.05)
        self._closing.set()
        self._q.put(None)
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()) + 5)
        left: dict[str, list[dict]] = {}
        with self._lock:
            rest = [*self.set_aside, *self._pending]
            self._pending.clear()
        while True:
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                break
            if op is not None:
                rest.append(op)
        for op in rest:
            left.setdefault(op["key"], []).append(_public(op))
        if self.on_undelivered:
            for key, ops in left.items():
                self.on_undelivered(key, ops)
        return left

    # ------------------------------------------------------------------ the thread

    def _put(self, op: dict) -> None:
        self._q.put(op)

    def _loop(self) -> None:
        backoff = 0.5
        while True:
            with self._lock:
                op = self._pending[0] if self._pending else None
            if op is None:
                try:
                    op = self._q.get(timeout=0.2)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                if op is None:
                    return
                with self._lock:
                    self._pending.append(op)
            try:
                self._apply(op)
            except Exception as e:  # noqa: BLE001 - sorted: retry (transient, bounded 500s) or set aside
                op["_tried"] = True  # it may have reached the server: a create tried again looks first
                kind = classify(e)
                attempts = op.get("_attempts", 0) + 1
                if kind == TRANSIENT or (kind == SERVER_ERROR and attempts < self.max_attempts):
                    self.failures += 1
                    if kind == SERVER_ERROR:
                        op["_attempts"] = attempts
                    if self._closing.is_set():
                        return
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                logging.getLogger("ssa_tune").warning("MLflow %s of %s set aside (%s): %s", op["op"], op["key"],
                                                      kind, e)
                self.dropped.append(f"{op['op']} {op['key']}: {e}")
                with self._lock:
                    self.set_aside.append(_public(op))
            backoff = 0.5
            with self._lock:
                if self._pending and self._pending[0] is op:
                    self._pending.pop(0)
            self.delivered += 1

    def _apply(self, op: dict) -> None:
        key, kind = op["key"], op["op"]
        t = self.tracker
        if kind == "create":
            if key in self.runs:  # a replayed create of a run that exists
                return
            run_id = t.create_child(self.parent_id, self.study, op["name"], op["params"], op["tags"],
                                    op.get("create_id"), look_first=bool(op.get("_tried")))
            self.runs[key] = run_id
            if self.on_created:
                self.on_created(key, run_id)
            return
        run_id = self.runs.get(key)
        if run_id is None:
            raise ValueError(f"no MLflow run for {key}")  # its create was set aside: nothing to attach to yet
        if kind == "metrics":
            log_metrics(t.client, run_id, op["metrics"], op["step"])
        elif kind == "tags":
            t.set_tags(run_id, op["tags"])
        elif kind == "finish":
            t.finish(run_id, op["state"], op.get("reason"), op.get("pruned_at"), op.get("status"))
        elif kind == "end":
            t.client.set_terminated(run_id, op["status"])
