"""Faults survived with nothing lost, each against the real service: the MLflow server stopped and started
again, PostgreSQL restarted, two drivers on one study, a driver on another host, and resources no node has."""

from __future__ import annotations

import json
import signal
import os
import socket
import subprocess
import sys
import time
import uuid

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import ROOT, SSA_TUNE, TINY, deep_update, run_cli, run_here
from .services import PG_URL, MlflowServer, PostgresServer, wait_for

pytestmark = pytest.mark.slow
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _spec(tmp_path, name: str, **changes) -> "os.PathLike":
    raw = deep_update(TINY, {"name": name, **changes})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _delete(name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:
        pass


def _children(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("ssa_tune.role") == "trial"]


def _start(args, tmp_path, env=None) -> subprocess.Popen:
    return subprocess.Popen([*SSA_TUNE, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _trial_poller(storage: str, name: str):
    """A function that returns the study's trials, or None while the study (or its SQLite file) does not exist
    yet. It reads through ssa-tune's storage, which serialises creating a new database's tables with the driver
    (a raw Optuna open raced it), and opens it once (a pool per poll leaked connections)."""
    opened = []

    def trials():
        if storage.startswith("sqlite:///") and not os.path.exists(storage[len("sqlite:///"):]):
            return None
        from ssa_tune.study import open_storage

        try:
            if not opened:
                opened.append(open_storage(storage))
            return optuna.load_study(study_name=name, storage=opened[0]).trials
        except KeyError:
            return None

    return trials


def _wait_done_trials(storage: str, name: str, n: int, proc: subprocess.Popen, timeout: float = 300):
    trials = _trial_poller(storage, name)

    def check():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        now = trials()
        return now is not None and sum(t.state in DONE for t in now) >= n

    wait_for(check, timeout, f"{n} finished trial(s) of {name}")


def test_mlflow_server_stopped_mid_study_and_started_again(tmp_path):
    """The tracking server goes away while trials run and comes back: the study finishes, Optuna holds every
    trial, and every MLflow run is completed afterwards (the mirror waited, nothing was dropped)."""
    server = MlflowServer(tmp_path / "mlflow").start()
    name = "mlflow-outage"
    spec = _spec(tmp_path, name, train={"max_steps": 600, "eval_every": 60}, budget={"n_trials": 4},
                 scheduler={"kind": "none"}, resources={"max_concurrent": 2})
    wd = tmp_path / "wd"
    driver = _start(["run", spec, "--workdir", wd, "--tracking-uri", server.uri, "--json"], tmp_path)
    try:
        _wait_done_trials(f"sqlite:///{wd / 'optuna.db'}", name, 1, driver)
        server.stop()
        # trials report and finish meanwhile: their metrics, tags and closing wait in the mirror
        _wait_done_trials(f"sqlite:///{wd / 'optuna.db'}", name, 2, driver)
        server.start()
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    try:
        assert driver.returncode == 0, err[-3000:]
        summary = json.loads(out)
        assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 4
        assert summary["mlflow_pending"] == []
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{wd / 'optuna.db'}")
        client, children = _children(server.uri, name)
        by_number = {int(r.data.tags["ssa_tune.trial_number"]): r for r in children}
        assert sorted(by_number) == [t.number for t in study.trials]
        assert len(children) == len(study.trials)  # one run per trial, none twice (a create whose answer the
        # stopping server never sent was once made again: a second run for the trial, RUNNING forever)
        for t in study.trials:
            run = by_number[t.number]
            assert run.info.status == "FINISHED" and run.data.tags["ssa_tune.state"] == "COMPLETE"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
            assert steps == list(range(60, 601, 60))  # every evaluation, including those made while it was down
        status = json.loads(run_here("status", name, "--workdir", wd, "--json").stdout)
        assert status["mlflow_pending"] == []
    finally:
        server.stop()


def test_mlflow_down_at_the_end_is_named_then_synced(tmp_path):
    """Writes the mirror could not deliver before the driver ended are kept in the study: `status` names the
    runs, `ssa-tune sync` sends them once the server is back."""
    from ssa_tune import study as st
    from ssa_tune.driver import Target, open_mirror, pending_mirror
    from ssa_tune.track import Tracker

    server = MlflowServer(tmp_path / "mlflow").start()
    wd = tmp_path / "wd"
    storage = f"sqlite:///{wd / 'optuna.db'}"
    study = optuna.create_study(study_name="late", storage=st.open_storage(storage))
    t = study.ask()
    study.tell(t, 1.0)
    study.set_user_attr(st.ATTR_SPEC, json.dumps(TINY))
    tracker = Tracker(server.uri, "late")
    study.set_user_attr(st.ATTR_PARENT_RUN, tracker.parent_run("late", None, {}))
    study.set_user_attr(st.ATTR_TRACKING, server.uri)
    target = Target(workdir=wd, storage=storage, tracking=server.uri, study="late")
    server.stop()
    mirror = open_mirror(study, target, tracker)
    mirror.create("trial-0", "trial-0", {"train.lr": 0.003}, {"ssa_tune.role": "trial", "ssa_tune.trial_number": 0})
    mirror.metrics("trial-0", {"val_loss": 1.0}, 10)
    mirror.finish("trial-0", "COMPLETE")
    left = mirror.close(timeout=3)
    assert set(left) == {"trial-0"} and len(left["trial-0"]) == 3
    assert set(pending_mirror(study)) == {"trial-0"}
    proc = run_here("status", "late", "--workdir", wd)
    assert "MLflow: not yet mirrored: trial-0" in proc.stdout
    server.start()
    try:
        assert run_here("sync", "late", "--workdir", wd).stdout.startswith("mlflow: sent 3 write(s)")
        client, children = _children(server.uri, "late")
        assert len(children) == 1 and children[0].info.status == "FINISHED"
        assert client.get_metric_history(children[0].info.run_id, "val_loss")[0].value == 1.0
        assert json.loads(run_here("status", "late", "--workdir", wd, "--json").stdout)["mlflow_pending"] == []
    finally:
        server.stop()


def test_postgresql_restarted_mid_study(tmp_path):
    """The study's PostgreSQL server restarts (fast shutdown: every connection cut) while trials run: the driver
    reconnects and finishes the budget, every trial number once. The server is this test's own, so the
    restart cuts no other test's connections."""
    server = PostgresServer().start()
    try:
        name = "pg-restart"
        spec = _spec(tmp_path, name, train={"max_steps": 160, "eval_every": 20}, budget={"n_trials": 4},
                     scheduler={"kind": "none"}, resources={"max_concurrent": 2})
        driver = _start(["run", spec, "--workdir", tmp_path / "wd", "--storage", server.url, "--json"], tmp_path)
        try:
            _wait_done_trials(server.url, name, 1, driver)
            server.restart()
            out, err = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, err[-3000:]
        summary = json.loads(out)
        assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 4 and summary["trials"]["running"] == 0
        study = optuna.load_study(study_name=name, storage=server.url)
        assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    finally:
        server.stop()


def test_two_drivers_on_one_postgresql_study(tmp_path):
    """`ssa-tune run` twice at once on the same study: the budget holds, every trial number once, one MLflow
    child run per trial, one parent run. Both URLs carry a password (the servers ignore it): it appears in
    no output, param or tag."""
    name = f"two-drivers-{uuid.uuid4().hex[:6]}"
    server = MlflowServer(tmp_path / "mlflow").start()
    spec = _spec(tmp_path, name, train={"max_steps": 40, "eval_every": 20}, budget={"n_trials": 6},
                 resources={"max_concurrent": 1})
    tracking = server.uri.replace("http://", "http://ssa:s3cret-tracking@")
    storage = PG_URL.replace("root@", "root:s3cret-storage@")
    args = ["run", spec, "--storage", storage, "--tracking-uri", tracking, "--json"]
    drivers = [_start([*args, "--workdir", tmp_path / f"wd{i}"], tmp_path) for i in range(2)]
    try:
        outs = [d.communicate(timeout=600) for d in drivers]
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
    try:
        for d, (out, err) in zip(drivers, outs):
            assert d.returncode == 0, err[-3000:]
            assert "s3cret" not in out + err
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert sum(t.state in DONE for t in study.trials) == 6
        assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
        owners = {t.user_attrs["ssa_tune.driver"] for t in study.trials}
        assert len(owners) == 2  # both drivers ran trials of the one study
        assert sum(st_arm == "baseline" for st_arm in (t.user_attrs["ssa_tune.arm"] for t in study.trials
                                                         if t.state in DONE)) == 3
        client, children = _children(server.uri, name)
        numbers = [int(r.data.tags["ssa_tune.trial_number"]) for r in children]
        assert sorted(numbers) == [t.number for t in study.trials]
        exp = client.get_experiment_by_name(name)
        everything = client.search_runs([exp.experiment_id])
        parents = [r for r in everything if r.data.tags.get("ssa_tune.role") == "study"]
        assert len(parents) == 1
        for r in everything:
            assert "s3cret" not in json.dumps({**r.data.tags, **r.data.params})
        status = run_here("status", name, "--storage", storage, "--workdir", tmp_path / "wd0")
        assert "s3cret" not in status.stdout + status.stderr
    finally:
        server.stop()
        _delete(name)


def test_resume_leaves_another_hosts_live_trials_alone(tmp_path):
    """A trial RUNNING under a driver on another host that is still alive (recent heartbeat) is not the
    resuming driver's to fail: it stays RUNNING, and the resumed driver fills only the rest of the budget."""
    from ssa_tune import study as st

    spec = _spec(tmp_path, "elsewhere", budget={"n_trials": 3}, scheduler={"kind": "none"})
    wd = tmp_path / "wd"
    run_here("run", spec, "--workdir", wd, "--trials", "2")
    storage = st.open_storage(f"sqlite:///{wd / 'optuna.db'}")
    study = optuna.load_study(study_name="elsewhere", storage=storage)
    study.set_user_attr(st.ATTR_DRIVER_PREFIX + "other-1", {"host": "another-host", "pid": 1, "beat": time.time(),
                                                             "stopped": False})
    live = study.ask()
    storage.set_trial_user_attr(live._trial_id, st.T_DRIVER, "other-1")
    storage.set_trial_user_attr(live._trial_id, st.T_ARM, "baseline")
    study.set_user_attr(st.ATTR_N_TRIALS, 4)
    summary = json.loads(run_here("resume", "elsewhere", "--workdir", wd, "--json").stdout)
    t = optuna.load_study(study_name="elsewhere", storage=storage).trials[live.number]
    assert t.state == optuna.trial.TrialState.RUNNING and "ssa_tune.fail_reason" not in t.user_attrs
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3  # the 4th is the other host's
    # once that driver falls silent past the grace period, its trial is failed and re-run
    study.set_user_attr(st.ATTR_DRIVER_PREFIX + "other-1", {"host": "another-host", "pid": 1,
                                                             "beat": time.time() - st.GRACE_S - 1, "stopped": False})
    summary = json.loads(run_here("resume", "elsewhere", "--workdir", wd, "--json").stdout)
    t = optuna.load_study(study_name="elsewhere", storage=storage).trials[live.number]
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["ssa_tune.fail_reason"].startswith("killed")
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 4


def test_a_gpu_nobody_has_is_one_line_not_a_hang(tmp_path):
    spec = _spec(tmp_path, "gpu", resources={"gpus_per_trial": 1})
    # not a hang: the command ends by itself (a hang would wait for a GPU forever; the 300 s limit only
    # bounds the test on a machine slowed by other work)
    proc = run_cli("run", spec, "--workdir", tmp_path / "wd", check=False, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {spec}: resources: one trial asks for CPU 1, GPU 1, but no node")
    assert not (tmp_path / "wd" / "optuna.db").exists()


def test_waiting_for_an_autoscaler_is_shown_and_bounded(tmp_path):
    """With `resources.autoscale` the study waits for a node that can hold a trial; `status` says so, and the
    wait ends with one line after `wait_for_resources_s`."""
    spec = _spec(tmp_path, "scale", resources={"custom": {"big_node": 1}, "autoscale": True,
                                               "wait_for_resources_s": 20})
    wd = tmp_path / "wd"
    driver = _start(["run", spec, "--workdir", wd], tmp_path)
    try:
        def waiting():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            if not (wd / "optuna.db").exists():
                return False
            proc = run_here("status", "scale", "--workdir", wd, "--json", check=False)
            return proc.returncode == 0 and json.loads(proc.stdout)["waiting_for_resources"]

        w = wait_for(waiting, 120, "status to show the wait")
        assert w["asks"] == {"CPU": 1.0, "big_node": 1.0}
        assert "waiting for resources since" in run_here("status", "scale", "--workdir", wd).stdout
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {spec}: resources: waited ")
    study = optuna.load_study(study_name="scale", storage=f"sqlite:///{wd / 'optuna.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.parametrize("phase", ["search", "robustness"])
def test_ctrl_c_stops_like_sigterm_and_resume_finishes(tmp_path, phase):
    """Ctrl-C (a real SIGINT to the driver) in either phase: exit code 130, the driver's running trials FAIL
    "interrupted" and re-queued, no partial robustness result stored; `resume` then finishes the budget and
    the robustness stage, and the report has its decision. (Ray Tune's own SIGINT handler once made
    `tuner.fit()` return normally: exit 0, a verdict from a partial stage that `resume` called done.)"""
    import threading

    from ssa_tune.study import ATTR_ROBUSTNESS

    name = f"ctrl-c-{phase}"
    spec = _spec(tmp_path, name, train={"max_steps": 120, "eval_every": 20}, budget={"n_trials": 2},
                 scheduler={"kind": "none"}, robustness={"top_k": 1, "seeds": 2, "confirm_seeds": 2},
                 resources={"max_concurrent": 2})  # both trials running when the signal comes
    wd = tmp_path / "wd"
    storage = f"sqlite:///{wd / 'optuna.db'}"
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`) has SIGINT ignored,
    # and an ignored disposition is inherited; the driver gets the default one, as in a user's shell
    driver = subprocess.Popen([*SSA_TUNE, "run", str(spec), "--workdir", str(wd)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    trials = _trial_poller(storage, name)
    try:
        if phase == "search":
            def running():
                assert driver.poll() is None, driver.stderr.read()[-3000:]
                return any(t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values
                           for t in trials() or [])
        else:
            def running():
                assert driver.poll() is None, driver.stderr.read()[-3000:]
                return any(line.startswith("  running  #robust-") for line in list(lines))
        wait_for(running, 300, f"the {phase} phase to be under way", interval=0.2)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    reader.join(timeout=10)
    study = optuna.load_study(study_name=name, storage=storage)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert ATTR_ROBUSTNESS not in study.user_attrs  # nothing of a stage cut short
    if phase == "search":
        stopped = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
        assert stopped and all("interrupted" in t.user_attrs["ssa_tune.fail_reason"] for t in stopped)
        assert all(len([r for r in study.trials if r.user_attrs.get("ssa_tune.retry_of") == t.number]) == 1
                   for t in stopped)
    summary = json.loads(run_here("resume", name, "--workdir", wd, "--json").stdout)
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 2 and summary["trials"]["running"] == 0
    assert summary["decision"] in ("helps", "hurts", "equivalent", "undecided")
    rep = json.loads((wd / "reports" / name / "report.json").read_text())
    assert rep["verdict"]["decision"] == summary["decision"]
    assert all(len(r["seeds"]) == 2 for r in rep["robustness"].values())  # every run of the stage, none cut
