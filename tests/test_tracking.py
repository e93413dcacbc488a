"""The MLflow mirror's handling of failed writes, against a real MLflow store (SQLite) and MLflow's own
exception types."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST,
                                          TEMPORARILY_UNAVAILABLE)
from mlflow.tracking import MlflowClient

from ssa_tune.track import PERMANENT, SERVER_ERROR, TRANSIENT, Mirror, Tracker, classify


@pytest.mark.parametrize("error,kind", [
    (requests.ConnectionError("Connection refused"), TRANSIENT),
    (ConnectionRefusedError(111, "refused"), TRANSIENT),
    (MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/create failed with exception "
                     "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded"), TRANSIENT),
    (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), TRANSIENT),
    (RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}), SERVER_ERROR),
    (MlflowException("bad request body: 500 characters at most", error_code=INVALID_PARAMETER_VALUE), PERMANENT),
    (MlflowException("Connection string 500 rows", error_code=RESOURCE_DOES_NOT_EXIST), PERMANENT),
    (ValueError("no MLflow run for trial-3"), PERMANENT),
])
def test_failures_are_classified_by_type_and_status_not_by_words(error, kind):
    """A 400 whose message says "500" or "connection" is the write's own fault: never retried forever (the
    old text match retried any error naming "500" or "connection" until shutdown)."""
    assert classify(error) == kind


def test_a_write_that_fails_for_good_is_set_aside_and_the_rest_goes_on(tmp_path):
    """The queue is ordered; one write the store refuses (a tag for a run that was never created) no longer
    stalls every later write: it is set aside, the writes behind it are delivered, and `close` hands it back
    (for `ssa-tune status` to report and `ssa-tune sync` to send again) instead of dropping it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "mirror", tmp_path / "artifacts")
    parent = tracker.parent_run("mirror", None, {})
    mirror = Mirror(tracker, parent, "mirror")
    mirror.create("trial-0", "trial-0", {"train.lr": 0.01}, {"ssa_tune.role": "trial"})
    mirror.metrics("trial-0", {"val_loss": 1.5}, 10)
    mirror.tags("ghost", {"ssa_tune.state": "COMPLETE"})  # no such run: can never apply
    mirror.metrics("trial-0", {"val_loss": 1.2}, 20)
    mirror.finish("trial-0", "COMPLETE")
    left = mirror.close(timeout=60)
    assert left == {"ghost": [{"op": "tags", "key": "ghost", "tags": {"ssa_tune.state": "COMPLETE"}}]}
    client = MlflowClient(uri)
    run = client.get_run(mirror.runs["trial-0"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [10, 20]


def test_a_server_error_is_retried_a_bounded_number_of_times(tmp_path):
    """An HTTP 500 may pass: retried, but `max_attempts` times, then set aside like a refused write."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "mirror", tmp_path / "artifacts")
    parent = tracker.parent_run("mirror", None, {})
    mirror = Mirror(tracker, parent, "mirror", max_backoff_s=0.05, max_attempts=3)
    calls = []
    real_apply = mirror._apply

    def apply(op):  # the store's own write, preceded by a server error for the one op named "flaky"
        if op["key"] == "flaky":
            calls.append(op["op"])
            raise MlflowException("Internal server error", error_code=INTERNAL_ERROR)
        return real_apply(op)

    mirror._apply = apply
    mirror.create("flaky", "flaky", {}, {})
    mirror.create("trial-1", "trial-1", {}, {})
    left = mirror.close(timeout=60)
    assert calls == ["create"] * 3 and list(left) == ["flaky"] and "trial-1" in mirror.runs


def test_a_create_whose_answer_was_lost_is_not_made_twice(tmp_path):
    """The server committed a child run and stopped before answering (a tracking server restarted mid-study):
    the mirror tries the create again, finds the run the first try made (by its create id) and goes on with it,
    instead of making a second run for the trial that stays RUNNING forever (seen in the MLflow-outage test)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "mirror", tmp_path / "artifacts")
    parent = tracker.parent_run("mirror", None, {})
    mirror = Mirror(tracker, parent, "mirror", max_backoff_s=0.05)
    real_create = tracker.client.create_run
    lost = []

    def create_run(*args, **kwargs):  # the store's own write, then the answer lost once
        run = real_create(*args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise requests.ConnectionError("Connection aborted: RemoteDisconnected")
        return run

    tracker.client.create_run = create_run
    mirror.create("trial-0", "trial-0", {"train.lr": 0.01}, {"ssa_tune.role": "trial"})
    mirror.metrics("trial-0", {"val_loss": 1.5}, 10)
    mirror.finish("trial-0", "COMPLETE")
    assert mirror.close(timeout=60) == {}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mirror")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "trial-0"]
    assert [r.info.run_id for r in children] == lost == [mirror.runs["trial-0"]]  # one run, the first try's
    assert children[0].info.status == "FINISHED" and children[0].data.params == {"train.lr": "0.01"}
    assert children[0].data.metrics == {"val_loss": 1.5}
