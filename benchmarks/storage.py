"""Per-trial bookkeeping cost as a study grows, on SQLite and PostgreSQL; two drivers on one study.

Bookkeeping = what the driver does for one trial besides training it, through ssa-tune's own code: ask under
the study lock (budget count, arm, owner), the define-by-run suggestions, 5 reported evaluations, tell; and the
trial's MLflow run (create with params, 5 batches of step metrics, close). Measured as the mean over a window of
trials around 10, 100 and 1,000 trials already in the study. The random sampler is used so that what grows
is the bookkeeping, not the sampler's model (TPE's own cost at 1,000 trials is printed separately).

    python benchmarks/storage.py [--quick] [--out FILE] [--pg URL]

Prints one JSON object. Target: flat, the cost at 1,000 trials <= 1.5x the cost at 10.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from ssa_tune import study as st
from ssa_tune.spec import validate
from ssa_tune.track import Tracker, log_metrics

SPEC = {
    "name": "bench", "dataset": {"kind": "markov"},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 128},
    "ssa": {"query_position": "log_expexp", "query_gate": "shared", "value_gate": "shared"},
    "search": {"ssa.query_gate": {"type": "categorical", "choices": ["none", "linear", "shared"]},
               "ssa.token_scale": {"type": "float", "low": 0.1, "high": 0.9},
               "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "budget": {"n_trials": 100000}, "sampler": {"kind": "random", "seed": 0},
}
EVALS = 5
BIG_BUDGET = {"baseline": 10**6, "ssa": 10**6}


def _spec(sampler: str = "random"):
    return validate({**SPEC, "sampler": {"kind": sampler, "seed": 0}}, "bench.yaml", check_data=False)


def one_trial(study, spec, url: str, driver: str, tracker: Tracker | None, parent: str | None) -> tuple[float, float]:
    """(optuna seconds, mlflow seconds) of one trial's bookkeeping."""
    t0 = time.perf_counter()
    with st.study_lock(url, study.study_name):
        arm = st.next_arm(study, BIG_BUDGET)
        ot = st.ask_arm(study, spec, arm, driver)
    params = st.suggest_all(ot, spec)
    for step in range(1, EVALS + 1):
        ot.report(1.0 / step, step * 20)
    study._storage.set_trial_user_attr(ot._trial_id, st.T_NODE, {"node_id": "n", "ip": "127.0.0.1"})
    study.tell(ot, 0.5 + 0.1 * (hash(str(params)) % 7))
    t1 = time.perf_counter()
    if tracker is None:
        return t1 - t0, 0.0
    run = tracker.create_child(parent, study.study_name, f"trial-{ot.number}", params,
                               {"ssa_tune.role": "trial", "ssa_tune.trial_number": ot.number})
    for step in range(1, EVALS + 1):
        log_metrics(tracker.client, run, {"val_loss": 1.0 / step, "train_loss": 1.0, "tokens_per_s": 1e5,
                                          **{f"layer0.m{i}": float(i) for i in range(20)}}, step * 20)
    tracker.finish(run, "COMPLETE")
    return t1 - t0, time.perf_counter() - t1


def growth(url: str, marks: list[int], window: int, tmp: Path) -> dict:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    storage = st.open_storage(url)
    spec = _spec()
    study = optuna.create_study(study_name=name, storage=storage, sampler=st.study_sampler(spec))
    tracker = Tracker(f"sqlite:///{tmp / f'{name}-mlflow.db'}", name, tmp / "mlartifacts")
    parent = tracker.parent_run(name, None, {})
    driver = st.new_driver_id()
    out = {}
    n = 0
    try:
        for mark in marks:
            # fill the study up to just before the mark without MLflow (its own store grows the same way)
            while n < mark - window // 2:
                one_trial(study, spec, url, driver, None, None)
                n += 1
            costs = [one_trial(study, spec, url, driver, tracker, parent) for _ in range(window)]
            n += window
            o, m = [c[0] for c in costs], [c[1] for c in costs]
            out[str(mark)] = {"optuna_ms": 1000 * statistics.fmean(o), "mlflow_ms": 1000 * statistics.fmean(m),
                              "total_ms": 1000 * statistics.fmean(a + b for a, b in costs), "trials_in_study": n}
        first, last = out[str(marks[0])]["total_ms"], out[str(marks[-1])]["total_ms"]
        out["ratio_last_to_first"] = last / first
        tpe_spec = _spec("tpe")
        study.sampler = st.study_sampler(tpe_spec)
        t0 = time.perf_counter()
        for _ in range(3):
            one_trial(study, tpe_spec, url, driver, None, None)
        out["tpe_sampling_optuna_ms_at_end"] = 1000 * (time.perf_counter() - t0) / 3
    finally:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except Exception:  # noqa: BLE001
            pass
    return out


def _driver(url: str, name: str, budget: int, barrier, q) -> None:
    storage = st.open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    spec = _spec()
    study.sampler = st.study_sampler(spec, offset=int(uuid.uuid4().int % 1000))
    driver = st.new_driver_id()
    barrier.wait()
    t0, mine = time.perf_counter(), 0
    budgets = {"baseline": budget // 2, "ssa": budget - budget // 2}
    while True:
        with st.study_lock(url, name):
            arm = st.next_arm(study, budgets)
            if arm == st.FINISHED:
                break
            if arm is None:  # the last slots are the other driver's running trials
                time.sleep(0.01)
                continue
            ot = st.ask_arm(study, spec, arm, driver)
        st.suggest_all(ot, spec)
        for step in range(1, EVALS + 1):
            ot.report(1.0 / step, step)
        study.tell(ot, 1.0)
        mine += 1
    q.put((mine, time.perf_counter() - t0))


def two_drivers(url: str, budget: int) -> dict:
    name = f"bench2-{uuid.uuid4().hex[:8]}"
    storage = st.open_storage(url)
    optuna.create_study(study_name=name, storage=storage)
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_driver, args=(url, name, budget, barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    trials = optuna.load_study(study_name=name, storage=storage).trials
    numbers = sorted(t.number for t in trials)
    out = {"budget": budget, "trials": len(trials), "per_driver": [r[0] for r in results],
           "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
           "numbers_unique_and_dense": numbers == list(range(len(trials))),
           "trials_per_s": sum(r[0] for r in results) / max(r[1] for r in results)}
    optuna.delete_study(study_name=name, storage=storage)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="marks 10 and 30, a window of 4 (a smoke test)")
    ap.add_argument("--pg", default="postgresql+psycopg2://root@127.0.0.1:5432/test")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    marks, window, budget = ([10, 30], 4, 20) if args.quick else ([10, 100, 1000], 10, 200)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"benchmark": "storage", "evaluations_per_trial": EVALS, "window": window,
                  "mlflow_store": "sqlite (the same for both Optuna backends)",
                  "sqlite": growth(f"sqlite:///{tmp / 'optuna.db'}", marks, window, tmp),
                  "postgresql": growth(args.pg, marks, window, tmp),
                  "two_drivers_postgresql": two_drivers(args.pg, budget)}
    result["target"] = "total per-trial cost at the last mark <= 1.5x the first"
    result["met"] = all(result[b]["ratio_last_to_first"] <= 1.5 for b in ("sqlite", "postgresql"))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
