"""The benchmark scripts run and print the JSON the README's numbers come from (shapes only: no timing is
asserted in tests; the numbers are measured by running the scripts, see the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_gpu_check_says_so_in_one_line_without_a_gpu():
    """Without a GPU the check is one line and exit 0: on CI's CPU machine as it is, and on a GPU machine with
    its GPUs hidden (CUDA_VISIBLE_DEVICES empty), so the test holds on both (it failed on a GPU machine)."""
    proc = _run("benchmarks/gpu.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.stdout.strip().startswith("no GPU:") and len(proc.stdout.strip().splitlines()) == 1


def test_gpu_check_quick_mode_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    _run("benchmarks/gpu.py", "--quick", "--out", str(out))
    r = json.loads(out.read_text())
    assert set(r["attention"]) == {"64", "128"}
    for row in r["attention"].values():
        assert row["ratio_ssa_plain"] > 0 and {"plain", "ssa", "authors"} <= set(row)
    assert {"plain", "ssa", "tokens_per_s_ratio", "decode_ratio"} <= set(r["gpt2_small"])
    assert r["study"]["ok"] and r["study"]["trials"]["complete"] == 2


def test_tuning_efficiency_quick_mode(tmp_path):
    out, png = tmp_path / "tuning.json", tmp_path / "curves.png"
    _run("benchmarks/tuning.py", "--quick", "--parts", "efficiency", "--trials", "2", "--out", str(out),
         "--png", str(png))
    r = json.loads(out.read_text())["efficiency"]
    assert set(r["studies"]["0"]) == {"tpe_asha", "tpe", "random"}
    for s in r["studies"]["0"].values():
        steps = [c[0] for c in s["curve"]]
        assert steps == sorted(steps) and s["total_steps"] == steps[-1] > 0
    assert png.stat().st_size > 10_000


def test_handover_profile_quick_mode(tmp_path):
    """The hand-over profile joins the workers' and the driver's clocks: every part of a slot's lost time is
    measured, none negative beyond clock noise, and they add up to the slot time lost."""
    out = tmp_path / "tuning.json"
    _run("benchmarks/tuning.py", "--quick", "--parts", "handover", "--out", str(out))
    h = json.loads(out.read_text())["handover"]
    assert h["trials"] == 4 and h["hand_overs"] >= 2
    mean = h["mean_s"]
    assert all(v is not None and v > -0.05 for v in mean.values()), mean
    # the parts cover the slot's lost time (all but the instant between the last `seconds` and its report)
    parts = sum(v for k, v in mean.items() if k != "slot lost")
    assert parts == pytest.approx(mean["slot lost"], abs=0.05), mean


def test_storage_benchmark_quick_mode():
    r = json.loads(_run("benchmarks/storage.py", "--quick").stdout)
    for backend in ("sqlite", "postgresql"):
        assert set(r[backend]) >= {"10", "30", "ratio_last_to_first"}
    d = r["two_drivers_postgresql"]
    assert d["numbers_unique_and_dense"] and d["trials"] == d["budget"] == sum(d["per_driver"])
