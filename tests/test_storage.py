"""Optuna storage: SQLite with concurrent writers loses nothing; PostgreSQL (the cluster store) works end to end.

The PostgreSQL server on 127.0.0.1:5432 (database `test`) is part of the test environment: these tests fail,
not skip, when it is missing (.ci/run starts it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import optuna
import pytest

from ssa_tune.study import open_storage

from .conftest import ROOT, run_here

PG_URL = "postgresql+psycopg2://root@127.0.0.1:5432/test"

WRITER = r"""
import sys, optuna
from ssa_tune.study import open_storage
storage = open_storage(sys.argv[1])
study = optuna.load_study(study_name="race", storage=storage)
for i in range(int(sys.argv[3])):
    t = study.ask()
    x = t.suggest_float("x", -1, 1)
    t.report(x, 1)
    study.tell(t, x * x + int(sys.argv[2]))
"""


def test_concurrent_sqlite_writers_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="race", storage=open_storage(url))
    writers, per_writer = 4, 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(w), str(per_writer)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    trials = study.trials
    assert len(trials) == writers * per_writer
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(writers * per_writer))
    for t in trials:  # each value belongs to its own params (no crossed writes)
        assert round(t.value - t.params["x"] ** 2, 9) in {float(w) for w in range(writers)}
        assert t.intermediate_values == {1: t.params["x"]}


OPEN_AT = """
import sys, time
from ssa_tune.study import open_storage
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
open_storage(sys.argv[1])
"""


def test_processes_opening_a_new_sqlite_storage_at_once_all_succeed(tmp_path):
    """A driver creates the file, then its tables; a `status` (or a second driver) that opens the database in
    between must wait for the tables, not create them again (UNIQUE constraint failed: alembic_version,
    seen in CI). The file exists, empty, when 6 processes open it at the same instant."""
    import time

    for attempt in range(3):
        db = tmp_path / f"new{attempt}.db"
        db.touch()  # made by sqlite3.connect in the first opener, tables not yet created
        url = f"sqlite:///{db}"
        start = time.time() + 4.0
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(start)], cwd=ROOT,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(e[-600:] for e in errors if e)
        assert optuna.get_all_study_summaries(open_storage(url)) == []


def test_sqlite_storage_is_in_wal_mode(tmp_path):
    import sqlite3

    open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    with sqlite3.connect(tmp_path / "o.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.slow
def test_study_on_postgresql(write_spec, tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    spec = write_spec({"budget": {"n_trials": 2}, "train": {"max_steps": 20, "eval_every": 10}, "resources": {"max_concurrent": 2}})
    storage = open_storage(PG_URL)
    try:
        summary = json.loads(run_here("run", spec, "--workdir", tmp_path / "wd", "--storage", PG_URL,
                                     "--study", name, "--json").stdout)
        assert summary["study"] == name and summary["storage"] == PG_URL
        c = summary["trials"]
        assert c["complete"] + c["pruned"] == 2 and c["failed"] == 0
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.trials) == 2 and study.user_attrs["ssa_tune.spec"]
        status = json.loads(run_here("status", name, "--storage", PG_URL, "--workdir", tmp_path / "wd",
                                    "--json").stdout)
        assert status["trials"] == c
        # nothing of the study went to the default SQLite file
        assert not (tmp_path / "wd" / "optuna.db").exists()
    finally:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass


def test_a_driver_is_alive_by_its_heartbeat_and_its_own_process():
    """A driver record on this host names a process by PID and start time: a reused PID (another process now)
    is a dead driver at once, and a live process whose heartbeat went stale is dead too (before: any live
    process with that PID kept the driver "alive" whatever its heartbeat said)."""
    import socket
    import time

    from ssa_tune import study as st

    now = time.time()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": st.process_start(os.getpid()),
          "beat": now, "stopped": False}
    assert me["started"] is not None
    assert st._alive(me, now)
    assert not st._alive({**me, "started": me["started"] + "0"}, now)  # the PID is another process's now
    assert not st._alive({**me, "beat": now - st.GRACE_S - 1}, now)  # alive process, silent driver
    assert not st._alive({**me, "stopped": True}, now)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not st._alive({**me, "pid": child.pid, "started": None}, now)  # no such process
    other = {**me, "host": "another-host", "pid": 1, "started": "x"}
    assert st._alive(other, now) and not st._alive({**other, "beat": now - st.GRACE_S - 1}, now)


def test_every_study_call_waits_out_a_postgresql_restart():
    """A Study reads and writes trials through Optuna's trial cache, which calls private RDBStorage methods
    (`_get_trials`, `_create_new_trial`, `_set_trial_param`, `_get_best_trial_id`): each must wait for a
    restarting server like the public ones (a study once failed mid-run on `get_trials` while PostgreSQL
    restarted). The server is this test's own; it is down when each call starts and back 1.5 s later."""
    import threading

    from .services import PostgresServer

    server = PostgresServer().start()
    try:
        study = optuna.create_study(study_name="restart", storage=open_storage(server.url))
        first = study.ask()
        first.suggest_float("x", 0.0, 1.0)
        study.tell(first, 0.5)

        def while_down(call):
            server.halt()
            back = threading.Timer(1.5, server.start)
            back.start()
            try:
                return call()
            finally:
                back.join()

        assert [t.number for t in while_down(lambda: study.get_trials(deepcopy=False))] == [0]  # _get_trials
        second = while_down(study.ask)  # _create_new_trial
        assert second.number == 1
        assert 0.0 <= while_down(lambda: second.suggest_float("x", 0.0, 1.0)) <= 1.0  # _set_trial_param
        study.tell(second, 0.25)
        assert while_down(lambda: study.best_trial).number == 1  # _get_best_trial_id
    finally:
        server.stop()
