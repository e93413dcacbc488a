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
# encoded text (kept by content, ssa_tune.data.corpus.token_cache) in a folder of the suite's, not the user's
os.environ.setdefault("SSA_TUNE_TOKEN_CACHE", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"ssa-tune-test-token-cache-{os.getuid()}"))

# Small enough for 2 CPU cores: one layer, d_model 32, 40 steps, one trial at a time. Each trial slot is a Ray
# worker process that costs ~6 s of CPU to start (torch, Ray Tune, the first optimizer), more than a tiny
# study trains; tests about running trials side by side (the end-to-end study, the schedulers, robustness
# rounds, faults while trials run, PostgreSQL, the cluster) ask for 2 themselves.
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
    "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
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


# Seconds the longest tests took alone on the 2-core machine (the slow tests one after another, 2026-12-07):
# enough to spread them over the workers; any other slow test counts 6 s, the rest 0.1 s.
LONG = {"test_readme_cluster_walkthrough": 67, "test_a_worker_node_lost_mid_trial": 42,
        "test_submit_ships_the_data_and_keeps_secrets_out_of_sight": 39,
        "test_ctrl_c_stops_like_sigterm_and_resume_finishes": 36,
        "test_mlflow_server_stopped_mid_study_and_started_again": 32,
        "test_waiting_for_an_autoscaler_is_shown_and_bounded": 31,
        "test_submit_waits_for_a_heads_job_agent_then_says_none_came": 30, "test_tuning_efficiency_quick_mode": 29,
        "test_sigkill_then_resume_finishes_the_budget": 28, "test_two_drivers_on_one_postgresql_study": 24,
        "test_poc_end_to_end_on_every_family": 23, "test_submit_refuses_what_the_cluster_cannot_do": 23,
        "test_postgresql_restarted_mid_study": 21, "test_mlflow_down_at_the_end_is_named_then_synced": 18,
        "test_gpu_check_quick_mode_runs_every_part": 17, "test_robustness_stage_report_and_robust_export": 16,
        "test_handover_profile_quick_mode": 16, "test_tradeoff_spec_exports_the_member_its_rule_chooses": 15,
        "test_resume_leaves_another_hosts_live_trials_alone": 15,
        "test_an_hf_study_end_to_end_then_export_and_convert_a_fresh_copy": 10}


def _estimate(item) -> float:
    name = item.name.split("[")[0]
    if name in LONG:
        return LONG[name]
    return 6.0 if item.get_closest_marker("slow") else 0.1


def pytest_collection_modifyitems(session, config, items):
    """Spread the long tests over the parallel workers (pytest-xdist's worksteal gives each worker one
    contiguous share of this list, then lets idle workers take from the others' ends): the tests are dealt,
    longest first, into one share per worker, each share balanced by estimated time and starting with its
    longest, so no worker is left running a long test alone at the end. Every worker computes the same order,
    as xdist requires."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    ranked = sorted(items, key=lambda it: (-_estimate(it), it.nodeid))
    if workers <= 1:
        items[:] = ranked
        return
    shares: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for it in ranked:  # greedy: the next longest test to the least loaded share
        i = min(range(workers), key=lambda k: (loads[k], k))
        shares[i].append(it)
        loads[i] += _estimate(it)
    # equal-sized contiguous shares are what worksteal cuts: pad the short shares' ends with quick tests
    size = -(-len(items) // workers)
    quick = [it for share in shares for it in share[size:]]
    shares = [share[:size] for share in shares]
    for share in shares:
        while len(share) < size and quick:
            share.append(quick.pop())
    items[:] = [it for share in shares for it in share] + quick
