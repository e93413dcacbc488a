"""Shared helpers: a tiny job spec and the real `ssa-tune` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SSA_TUNE = [sys.executable, "-m", "ssa_tune.cli"]
# the report's importance intervals from 40 bootstrap resamples, not 200: every study a test runs (in this
# process or an `ssa-tune` subprocess) writes a report; the default is tested in test_analyse
os.environ.setdefault("SSA_TUNE_IMPORTANCE_RESAMPLES", "40")

# Small enough for 2 CPU cores: one layer, d_model 32, 40 steps, 2 trials at a time.
TINY = {
    "name": "tiny",
    "dataset": {"kind": "markov"},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 128},
    "train": {"max_steps": 40, "batch_size": 8, "eval_every": 20, "lr": 3.0e-3, "warmup_steps": 5},
    "ssa": {"query_position": "log_expexp", "query_gate": "shared", "value_gate": "shared"},
    "search": {
        "ssa.query_gate": {"type": "categorical", "choices": ["none", "linear", "shared"]},
        "ssa.token_scale": {"type": "float", "low": 0.1, "high": 0.9, "when": {"ssa.query_gate": ["linear", "shared"]}},
        "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    },
    "budget": {"n_trials": 4},
    "scheduler": {"kind": "asha", "grace_steps": 20, "reduction_factor": 2},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
    "sampler": {"kind": "tpe", "seed": 0},
}


def deep_update(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: a second intra-op thread only adds synchronisation, and on a loaded machine a preempted
    worker thread stalls every op (the suite ran 7x slower). Restored after the module that asks for it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_spec(tmp_path):
    def write(changes: dict | None = None, name: str = "spec.yaml", drop: tuple[str, ...] = ()) -> Path:
        spec = deep_update(TINY, changes or {})
        for k in drop:
            spec.pop(k, None)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        return p

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SSA_TUNE, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"ssa-tune {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def run_here(*args: str, cwd: Path | None = None, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`ssa-tune ARGS` inside this test process (typer's CliRunner): the CLI's own code from argument parsing to
    exit code, minus a new interpreter, its imports and a Ray start for every command. A study started here
    starts this process's local Ray instance once (`tune.init_ray`), and every later study of the process
    (one pytest-xdist worker) runs on it. For what only a real process shows (signals, a killed driver,
    a fresh `import`, the installed `ssa-tune` script) tests use `run_cli`."""
    from typer.testing import CliRunner

    from ssa_tune.cli import app

    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(here)
    proc = subprocess.CompletedProcess(["ssa-tune", *map(str, args)], result.exit_code, result.stdout, result.stderr)
    if check and result.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        raise AssertionError(f"ssa-tune {' '.join(map(str, args))} exited {result.exit_code}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}\n{tb[-5000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


def pytest_sessionstart(session):
    """This worker's PostgreSQL database (tests/services.py: one per pytest-xdist worker). Without a server
    nothing is created here, and the PostgreSQL tests fail on their own: they never skip."""
    from .services import create_pg_database

    try:
        create_pg_database()
    except Exception:  # noqa: BLE001 - the tests that need it say what is wrong
        pass


def pytest_collection_modifyitems(session, config, items):
    """The long end-to-end tests first, so that parallel workers (pytest-xdist) do not end on one of them
    while the others sit idle. The same order in every worker, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
