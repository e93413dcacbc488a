"""The study driver: set a study up, run it to its budget on Ray, keep its MLflow mirror, read it back.

One direction: the CLI calls `run_study` / `status` / `sync`; this module uses the Optuna side (`study`),
Ray (`tune`) and MLflow (`track`). Several drivers may run one study at once (see `study`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import study as st
from .compat import storage_of, study_id_of
from .errors import UserError
from .spec import JobSpec
from .track import Mirror, Tracker, check_tracking, default_tracking, experiment_url
from .tune import cluster


@dataclass
class Target:
    """Where a study lives."""

    workdir: Path
    storage: str
    tracking: str
    study: str


def resolve_target(spec_storage: str | None, spec_tracking: str | None, workdir: str | None, storage: str | None,
                   tracking: str | None, study: str | None) -> Target:
    workdir = workdir or os.environ.get("SSA_TUNE_HOME")
    if workdir is None and cluster.in_ray_job():  # not inside the job's working dir, which Ray owns
        import tempfile

        workdir = tempfile.mkdtemp(prefix="ssa-tune-job-")
    wd = Path(workdir or ".ssa_tune").expanduser().resolve()
    return Target(workdir=wd, storage=storage or spec_storage or st.default_storage(wd),
                  tracking=tracking or spec_tracking or default_tracking(wd), study=study or "")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix.startswith("search"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return {k: v for k, v in out.items() if k not in ("storage", "tracking")}  # URLs may carry passwords


# ----------------------------------------------------------------------------------- the MLflow mirror


def run_ids(study) -> dict[str, str]:
    """Every MLflow run of the study by key ("trial-3", "robust-...", "study")."""
    runs: dict[str, str] = {}
    for k, v in study.user_attrs.items():
        if k.startswith(st.ATTR_MLFLOW_RUN) and v:
            runs[k[len(st.ATTR_MLFLOW_RUN):]] = v
    for t in study.get_trials(deepcopy=False):
        if st.T_RUN in t.user_attrs:
            runs[f"trial-{t.number}"] = t.user_attrs[st.T_RUN]
    parent = study.user_attrs.get(st.ATTR_PARENT_RUN)
    if parent:
        runs["study"] = parent
    return runs


def open_mirror(study, target: Target, tracker: Tracker | None = None) -> Mirror:
    """The study's MLflow mirror: run ids and undelivered writes are kept in the Optuna study. (A finished
    trial's own attributes are frozen, so what arrives after the trial ended is kept at study level.)"""
    import optuna

    tracker = tracker or Tracker(target.tracking, study.study_name, target.workdir / "mlartifacts")
    storage = storage_of(study)

    def created(key: str, run_id: str) -> None:
        if key.startswith("trial-") and key[6:].isdigit():
            tid = storage.get_trial_id_from_study_id_trial_number(study_id_of(study), int(key[6:]))
            try:
                storage.set_trial_user_attr(tid, st.T_RUN, run_id)
                return
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        study.set_user_attr(st.ATTR_MLFLOW_RUN + key, run_id)

    def undelivered(key: str, ops: list[dict]) -> None:
        before = study.user_attrs.get(f"{st.ATTR_MLFLOW_PENDING}.{key}") or []
        study.set_user_attr(f"{st.ATTR_MLFLOW_PENDING}.{key}", before + ops)

    return Mirror(tracker, study.user_attrs.get(st.ATTR_PARENT_RUN), study.study_name, on_created=created,
                  on_undelivered=undelivered, runs=run_ids(study))


def pending_mirror(study) -> dict[str, list[dict]]:
    """MLflow writes a driver could not deliver (the tracking server was away when it ended), by run key."""
    prefix = st.ATTR_MLFLOW_PENDING + "."
    return {k[len(prefix):]: v for k, v in study.user_attrs.items() if k.startswith(prefix) and v}


def _clear_pending(study, keys) -> None:
    for key in keys:
        study.set_user_attr(f"{st.ATTR_MLFLOW_PENDING}.{key}", [])


def replay_pending(study, mirror: Mirror) -> int:
    """Hand what an earlier driver could not deliver to `mirror`; returns how many writes."""
    pending = pending_mirror(study)
    if not pending:
        return 0
    _clear_pending(study, pending)  # the mirror keeps them again if they still cannot be delivered
    n = 0
    for ops in pending.values():
        mirror.replay(ops)
        n += len(ops)
    return n


def sync(study, target: Target, timeout: float = 120.0) -> dict[str, Any]:
    """`ssa-tune sync`: send the MLflow writes earlier drivers could not deliver."""
    check_tracking(target.tracking)
    mirror = open_mirror(study, target)
    n = replay_pending(study, mirror)
    left = mirror.close(timeout)
    return {"sent": n - sum(len(v) for v in left.values()), "still_pending": sorted(left)}


# ---------------------------------------------------------------------------------------------- running


def _prepare_tracking(uri: str) -> None:
    """What the tracking set-up needs that writes nothing in the work dir: imports, the schema template."""
    try:
        from mlflow.tracking import MlflowClient  # noqa: F401

        if uri.startswith("sqlite:///"):
            from .track import _schema_template

            _schema_template()
    except Exception:  # noqa: BLE001 - the set-up proper reports any problem, in order
        pass


class _Heartbeat:
    """Records every few seconds that this driver is alive, so other drivers leave its trials alone."""

    def __init__(self, study, driver: str):
        self.study, self.driver = study, driver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssa-tune-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(st.HEARTBEAT_S):
            try:
                st.beat(self.study, self.driver)
            except Exception:  # noqa: BLE001 - a database restart: the next beat will do
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            st.beat(self.study, self.driver, stopped=True)
        except Exception:  # noqa: BLE001
            pass


def run_study(spec: JobSpec, target: Target, *, resume: bool = False, n_trials: int | None = None,
              address: str | None = None, out: Callable[[str], None] = print,
              robustness: str = "auto", deadline: float | None = None,
              search_deadline: float | None = None) -> dict[str, Any]:
    """Run (or continue) the study to its budget, then its robustness stage on the same workers; returns the
    summary `ssa-tune status` prints. `robustness`: "auto" runs the stage when the spec has one and this run
    added trials (or it never ran), "always" re-runs it, "never" skips it. `deadline` (time.monotonic): no
    confirmation round starts that could not end by then, and `search_deadline`: no search trial starts after
    it (`ssa-tune poc`'s time budget)."""
    study_name = target.study or spec.name
    # everything that can be wrong is checked before anything is written
    from .analyse import resamples

    resamples()  # the report's setting, read at the end: a bad value is one line now, not after the study
    st.check_storage(target.storage)
    check_tracking(target.tracking)
    if cluster.in_ray_job():  # work from a folder of our own: Ray may unpack the job's folder anew meanwhile
        target.workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(target.workdir)
    prep = threading.Thread(target=_prepare_tracking, args=(target.tracking,), daemon=True)
    prep.start()  # MLflow's imports (and, once per machine, its empty schema) while Ray starts
    cluster.init_ray(address)  # first: Ray reads RAY_AUTH_MODE (a cluster's token) once, when it is imported
    cluster.check_resources(spec)
    from .tune.run import fit  # Ray Tune: imports Ray, so only after init_ray
    prep.join()
    target.workdir.mkdir(parents=True, exist_ok=True)
    storage = st.open_storage(target.storage)
    tracker = Tracker(target.tracking, study_name, target.workdir / "mlartifacts")
    import optuna

    budget = n_trials or spec.n_trials
    spec_json = json.dumps(spec.raw, sort_keys=True, default=str)
    driver = st.new_driver_id()
    with st.study_lock(target.storage, study_name):
        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        study = st.create_or_load(spec, storage, study_name)
        study.sampler = st.study_sampler(spec, offset=len(study.trials))
        if study_name in existing:
            recorded = study.user_attrs.get(st.ATTR_SPEC)
            if recorded is not None and recorded != spec_json and not resume:
                raise UserError(f"study {study_name!r} exists with a different spec; pass --study NEW_NAME "
                                f"or `ssa-tune resume {study_name}`", spec.path, "name")
        if not (resume and st.ATTR_SPEC in study.user_attrs):  # resume keeps the spec the study was made with
            study.set_user_attr(st.ATTR_SPEC, spec_json)
        study.set_user_attr(st.ATTR_SPEC_PATH, spec.path)
        study.set_user_attr(st.ATTR_N_TRIALS, budget)
        st.beat(study, driver)
        # a driver that died left RUNNING trials: FAIL them (and their MLflow runs), re-run their params once
        lost = st.fail_trials(study, st.orphans(study, driver), "killed: its driver stopped while the trial ran")
        retried = st.enqueue_retries(study, lost) if lost else 0
        parent = tracker.parent_run(study_name, study.user_attrs.get(st.ATTR_PARENT_RUN),
                                    {"ssa_tune.storage": st.redact(target.storage)})
        study.set_user_attr(st.ATTR_PARENT_RUN, parent)
        study.set_user_attr(st.ATTR_EXPERIMENT, tracker.experiment_id)
        study.set_user_attr(st.ATTR_TRACKING, target.tracking)
        if not study.trials:  # each arm starts from its default: the plain model, and the spec's SSA settings
            for arm in spec.arms:
                st.enqueue(study, spec, arm, spec.default_params(arm))
    heartbeat = _Heartbeat(study, driver)
    mirror = open_mirror(study, target, tracker)
    try:
        replayed = replay_pending(study, mirror)
        for t in lost:
            mirror.finish(f"trial-{t.number}", "FAIL", "killed: its driver stopped while the trial ran", status="KILLED")
        tracker.log_study(parent, params={f"spec.{k}": v for k, v in _flat(spec.raw).items()},
                          tags={"ssa_tune.spec_path": spec.path})
        if lost:
            out(f"resume: {len(lost)} interrupted trial(s) marked FAIL, {retried} re-queued")
        if replayed:
            out(f"mlflow: re-sending {replayed} write(s) an earlier driver could not deliver")
        budgets = spec.arm_budgets(budget)
        arms = ", ".join(f"{a} {budgets[a]}" for a in spec.arms)
        out(f"study {study_name}: {st.budget_used(study)}/{budget} trials done ({arms}); storage "
            f"{st.redact(target.storage)}; tracking {st.redact(target.tracking)}")
        trials_before = len(study.trials)

        def make_plan(new_trials: bool):
            from .robustness import Plan

            if robustness == "never" or spec.robustness is None and robustness != "always":
                return None
            if robustness == "auto" and not new_trials and study.user_attrs.get(st.ATTR_ROBUSTNESS) is not None:
                out("robustness: already done for these trials (ssa-tune robustness STUDY re-runs it)")
                return None
            if st.best_trial(study) is None:
                out("robustness: no complete trial to re-run")
                return None
            try:
                return Plan(study, spec, out, deadline)
            except UserError as e:  # e.g. no trial meets the spec's `select:` conditions: say so, keep the search
                out(f"robustness: skipped: {e.reason}")
                return None

        try:
            plan = fit(spec, study, target.storage, target.workdir, mirror, driver, budgets, out, make_plan,
                            search_deadline)
        except (KeyboardInterrupt, SystemExit):
            _stop_own_trials(study, driver, mirror, "stopped: the driver was interrupted (SIGINT/SIGTERM)")
            raise
        if plan is not None:
            plan.finish()
        summary = status(study, target)
        summary["new_trials"] = len(study.trials) - trials_before
        metrics: dict[str, float] = {f"trials_{k}": v for k, v in summary["trials"].items()}
        if "front" in summary:  # the Pareto front on the study's run: a tag to read, the members to inspect
            mirror.tags("study", {"ssa_tune.pareto_front": json.dumps(
                [{"trial": m["number"], "arm": m["arm"], **m["values"]} for m in summary["front"]])[:5000]})
        for arm, best in summary["best_by_arm"].items():
            if best and isinstance(best["value"], (int, float)):
                metrics[f"best_value_{arm}"] = best["value"]
        best = summary["best"]
        if best and isinstance(best["value"], (int, float)):
            metrics["best_value"] = best["value"]
        mirror.metrics("study", metrics, None)
        if best:
            mirror.tags("study", {"ssa_tune.best_trial": best["number"]})
        if not set(st.live_drivers(study)) - {driver}:  # the last driver out closes the study's run
            mirror.end("study", "FINISHED")
    finally:
        heartbeat.stop()
        left = mirror.close(timeout=60.0)
    if left:
        out(f"mlflow: {len(left)} run(s) not fully mirrored (tracking server unreachable): "
            f"{', '.join(sorted(left))}; `ssa-tune sync {study_name}` re-sends them")
    summary["mlflow_pending"] = sorted(left)
    return summary


def _stop_own_trials(study, driver: str, mirror: Mirror, reason: str) -> None:
    """An interrupted driver closes its own running trials (FAIL, MLflow KILLED); `resume` re-runs them once."""
    from optuna.trial import TrialState

    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(st.T_DRIVER) == driver]
    for t in st.fail_trials(study, mine, reason):
        st.enqueue_retries(study, [t])
        mirror.finish(f"trial-{t.number}", "FAIL", reason, status="KILLED")


# ---------------------------------------------------------------------------------------------- reading


def _trial_row(t) -> dict[str, Any]:
    return {"number": t.number, "arm": st.arm_of(t),
            "value": t.value if len(t.values) == 1 else t.values, "params": dict(t.params)}


def front(study, objectives: list[str], directions: list[str], arm: str | None = None) -> list[dict]:
    """The Pareto front (of one arm), each member with its objective values named by metric."""
    from .selection import pareto_front

    members = pareto_front(st.rows(study, objectives, arm), objectives, directions)
    return [{"number": r["number"], "arm": r["arm"], "values": {m: r["metrics"][m] for m in objectives},
             "params": r["params"]} for r in sorted(members, key=lambda r: r["number"])]


def status(study, target: Target) -> dict[str, Any]:
    spec_raw = study.user_attrs.get(st.ATTR_SPEC)
    arms = sorted({st.arm_of(t) for t in study.get_trials(deepcopy=False)})
    multi = len(study.directions) > 1
    best = None if multi else st.best_trial(study)
    waiting = study.user_attrs.get(st.ATTR_WAITING)
    drivers = st.live_drivers(study)
    tracking = target.tracking
    exp = study.user_attrs.get(st.ATTR_EXPERIMENT)
    return {
        "study": study.study_name,
        "storage": st.redact(target.storage),
        "tracking_uri": st.redact(tracking),
        "mlflow_ui": experiment_url(tracking, exp) if exp else None,
        "n_trials": study.user_attrs.get(st.ATTR_N_TRIALS),
        "trials": st.counts(study),
        "trials_by_arm": {a: st.counts(study, a) for a in arms},
        "best": None if best is None else _trial_row(best),
        "best_by_arm": {} if multi else {a: (None if (b := st.best_trial(study, a)) is None else _trial_row(b))
                                         for a in arms},
        "drivers": [{"id": k, "host": v.get("host"), "pid": v.get("pid")} for k, v in drivers.items()],
        "waiting_for_resources": waiting if waiting and drivers else None,
        "mlflow_pending": sorted(pending_mirror(study)),
        "has_spec": spec_raw is not None,
        "verdict": _verdict_summary(study),
    } | (_fronts(study, spec_raw, arms) if multi and spec_raw else {})


def _verdict_summary(study) -> dict[str, Any] | None:
    """The robustness stage's answer, as far as it got: decision, its line, the recommendation."""

    v = (study.user_attrs.get(st.ATTR_ROBUSTNESS) or {}).get("verdict")
    if not v:
        return None
    alone = (v.get("contrasts") or {}).get("ssa_alone") or {}
    return {"decision": v.get("decision", "undecided"), "answer": v.get("answer"),
            "recommendation": (v.get("recommendation") or {}).get("text"),
            "ssa_alone": alone.get("decision"), "seed_pairs": len(v.get("seeds") or [])}


def _fronts(study, spec_raw: str, arms: list[str]) -> dict[str, Any]:
    from .spec import validate

    spec = validate(json.loads(spec_raw), study.user_attrs.get(st.ATTR_SPEC_PATH, study.study_name), check_data=False)
    objectives, directions = [o.metric for o in spec.objectives], [o.direction for o in spec.objectives]
    return {"objectives": objectives, "front": front(study, objectives, directions),
            "front_by_arm": {a: front(study, objectives, directions, a) for a in arms}}
