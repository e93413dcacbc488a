"""Running a study: Ray Tune executes the trials of an Optuna study, MLflow mirrors them.

Every Ray call of the project is in this module (Ray's API moves between releases; the version is pinned).
Early stopping has one owner, the Ray scheduler (ASHA by default); Optuna's own pruner is off, and a trial
the scheduler stopped is told to Optuna as PRUNED.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import study as st
import optuna
from optuna.trial import TrialState

from .errors import UserError
from .spec import JobSpec, validate
from .trial import KEY_NUMBER, KEY_RUN, KEY_TRIAL_ID, execute, failure_reason, trial_params
from .track import Tracker, check_tracking, default_tracking


@dataclass
class Target:
    """Where a study lives."""

    workdir: Path
    storage: str
    tracking: str
    study: str


def resolve_target(spec_storage: str | None, spec_tracking: str | None, workdir: str | None, storage: str | None,
                   tracking: str | None, study: str | None) -> Target:
    wd = Path(workdir or os.environ.get("SSA_TUNE_HOME") or ".ssa_tune").expanduser().resolve()
    return Target(workdir=wd, storage=storage or spec_storage or st.default_storage(wd),
                  tracking=tracking or spec_tracking or default_tracking(wd), study=study or "")


# ---------------------------------------------------------------------------------------- the worker


def _trainable(config: dict, ctx: dict) -> None:
    """A Ray Tune function trainable: one Optuna trial."""
    import ray.tune

    number, run_id = config[KEY_NUMBER], config[KEY_RUN]
    params = {k: v for k, v in config.items() if not k.startswith("ssa_tune.")}
    try:
        spec = validate(json.loads(ctx["spec"]), ctx["spec_path"], check_data=False)
        execute(spec, params, ctx["cpus"], ctx["gpus"], report=ray.tune.report, tracking_uri=ctx["tracking"],
                run_id=run_id)
    except Exception as e:
        reason = failure_reason(e)
        # the reason goes to both stores before Ray marks the trial ERROR (-> Optuna FAIL, MLflow FAILED)
        try:
            storage = st.open_storage(ctx["storage"])
            storage.set_trial_user_attr(config[KEY_TRIAL_ID], st.T_REASON, reason)
        except Exception:
            pass
        raise RuntimeError(f"trial {number} failed: {reason}") from None


# ---------------------------------------------------------------------------------------- the searcher


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch on the study's own storage, plus: the trial number and its MLflow child run in
        each config, scheduler stops told to Optuna as PRUNED, failures as FAIL with their reason."""

        def __init__(self, *, spec: JobSpec, tracker: Tracker, parent_run: str, max_steps: int,
                     on_done: Callable[[Any, str], None], **kw):
            self._spec, self._tracker, self._parent_run = spec, tracker, parent_run
            self._max_steps, self._on_done = max_steps, on_done
            self._runs: dict[str, str] = {}
            self._last: dict[str, dict] = {}
            self._reported: dict[str, set[int]] = {}
            super().__init__(space=lambda trial: st.suggest_all(trial, spec), **kw)

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if config is None:
                return None
            ot = self._ot_trials[trial_id]
            dataset, model, train, ssa = self._spec.trial_config(config)
            run_id = self._tracker.child_run(self._parent_run, self._study_name, ot.number,
                                             trial_params(dataset, model, train, ssa))
            self._ot_study._storage.set_trial_user_attr(ot._trial_id, st.T_RUN, run_id)
            self._runs[trial_id] = run_id
            return {**config, KEY_NUMBER: ot.number, KEY_RUN: run_id, KEY_TRIAL_ID: ot._trial_id}

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: the study's storage is the state, and resume reads it from there."""

        def restore(self, checkpoint_path: str) -> None:
            pass

        def on_trial_result(self, trial_id: str, result: dict):
            self._last[trial_id] = result
            self._report(trial_id, result)

        def _report(self, trial_id: str, result: dict) -> None:
            """Intermediate values keyed by training step (not Ray's iteration), as the curves in MLflow."""
            if isinstance(self.metric, list) or trial_id in self._completed_trials:
                return
            v, step = result.get(self.metric), result.get("step")
            if v is None or step is None or not math.isfinite(v):
                return
            seen = self._reported.setdefault(trial_id, set())
            if int(step) not in seen:  # the final result can arrive here twice (result, then completion)
                seen.add(int(step))
                self._ot_trials[trial_id].report(float(v), int(step))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            ot = self._ot_trials[trial_id]
            result = result or self._last.get(trial_id)
            storage = self._ot_study._storage
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = None if not result else [result.get(m) for m in metrics]
            if error or values is None or any(v is None or not math.isfinite(v) for v in values):
                state, told = "FAIL", None
                reason = storage.get_trial(ot._trial_id).user_attrs.get(st.T_REASON)
                if reason is None:
                    reason = "the trial's worker process died (crash or killed)" if error else "no finite objective reported"
                    storage.set_trial_user_attr(ot._trial_id, st.T_REASON, reason)
            elif int(result.get("step", 0)) < self._max_steps:
                state, told, reason = "PRUNED", None, None
                # the result that made the scheduler stop the trial never reached on_trial_result
                self._report(trial_id, result)
                storage.set_trial_user_attr(ot._trial_id, st.T_PRUNED_AT, int(result["step"]))
            else:
                state, told, reason = "COMPLETE", values[0] if len(values) == 1 else values, None
                self._report(trial_id, result)  # the final result may also bypass on_trial_result
            from optuna.trial import TrialState

            ts = {"FAIL": TrialState.FAIL, "PRUNED": TrialState.PRUNED, "COMPLETE": TrialState.COMPLETE}[state]
            # Optuna takes no value with FAIL, and records a PRUNED trial's last intermediate value itself
            self._ot_study.tell(ot, told, state=ts)
            self._completed_trials.add(trial_id)
            run_id = self._runs.get(trial_id)
            if run_id:
                self._tracker.finish_trial(run_id, state, reason,
                                           int(result["step"]) if state == "PRUNED" else None)
            self._on_done(ot.number, state, values, reason)

    return StudySearch


def _scheduler(spec: JobSpec, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    s = spec.scheduler
    eval_every = spec.train_config({}).eval_every
    grace = s.get("grace_steps") or eval_every
    objective = spec.objectives[0]
    om = {"metric": objective.metric, "mode": "min" if objective.direction == "minimize" else "max"}
    if s["kind"] == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=min(grace, max_steps),
                             reduction_factor=s["reduction_factor"], **om)
    if s["kind"] == "hyperband":
        return HyperBandScheduler(time_attr="step", max_t=max_steps, reduction_factor=s["reduction_factor"], **om)
    if s["kind"] == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=3, **om)
    return FIFOScheduler()


def _progress_callback(spec: JobSpec, out: Callable[[str], None]):
    from ray.tune import Callback

    objective = spec.objectives[0]
    sign = 1 if objective.direction == "minimize" else -1

    class Progress(Callback):
        """A live view: one line per evaluation (throttled) and per finished trial, with the best so far."""

        def __init__(self):
            self.best: tuple[float, int] | None = None
            self.last_print = 0.0
            self.running: dict[str, str] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            n = trial.config.get(KEY_NUMBER, "?")
            v = result.get(objective.metric)
            self.running[trial.trial_id] = f"#{n} step {result.get('step')}: {objective.metric}={_fmt(v)}"
            now = time.monotonic()
            if now - self.last_print >= 2.0:
                self.last_print = now
                out("  running  " + " | ".join(self.running.values()))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.pop(trial.trial_id, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.pop(trial.trial_id, None)

        def done(self, number, state, values, reason):
            v = values[0] if values else None
            if state != "FAIL" and v is not None and (self.best is None or sign * v < sign * self.best[0]):
                self.best = (v, number)
            best = f"best #{self.best[1]} {objective.metric}={_fmt(self.best[0])}" if self.best else "best: none yet"
            detail = f" ({reason})" if reason else ""
            out(f"  trial {number:>3} {state:<8} {objective.metric}={_fmt(v)}{detail}   {best}")

    return Progress()


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


# ---------------------------------------------------------------------------------------- the driver


def _quiet_ray() -> None:
    """Our own progress lines replace Ray's tables and its end-of-run error banner."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("ray.tune", "ray.air", "ray.train", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _init_ray(address: str | None, workdir: Path) -> None:
    _quiet_ray()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR",
                          "runtime_env": {"worker_process_setup_hook": "workers.setup.setup"}}
    try:
        if address:
            ray.init(address=address, **kw)
        else:  # a local Ray, or the cluster of the Ray job this driver runs in; no CPU/GPU counts given
            ray.init(include_dashboard=False, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).strip().splitlines()[0]}", field="address") from None


def submit(spec_path: Path, address: str, storage: str | None, tracking: str | None, study: str | None,
           overrides: list[str], wait: bool, out: Callable[[str], None] = print) -> str:
    """Submit `ssa-tune run SPEC` as a Ray job to a cluster (Ray Jobs); the spec's folder is the working dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        client = JobSubmissionClient(address)
    except Exception as e:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {str(e).strip().splitlines()[0]}",
                        field="--address") from None
    parts = ["ssa-tune", "run", spec_path.name]
    for flag, value in (("--storage", storage), ("--tracking-uri", tracking), ("--study", study)):
        if value:
            parts += [flag, value]
    for o in overrides:
        parts += ["--set", o]
    import shlex

    entrypoint = " ".join(shlex.quote(p) for p in parts)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(spec_path.parent)})
    out(f"submitted {job_id}: {entrypoint.replace(storage or chr(0), st.redact(storage) if storage else '')}")
    out(f"logs: ray job logs --address {address} {job_id} --follow")
    if wait:
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while (status := client.get_job_status(job_id)) not in terminal:
            time.sleep(2)
        out(f"{job_id}: {status.value}")
        if status != JobStatus.SUCCEEDED:
            raise UserError(f"job {job_id} ended {status.value}; see `ray job logs {job_id}`", field="--address")
    return job_id


def run_study(spec: JobSpec, target: Target, *, resume: bool = False, n_trials: int | None = None,
              address: str | None = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the study to its budget; returns the summary `ssa-tune status` prints."""
    study_name = target.study or spec.name
    st.check_storage(target.storage)
    check_tracking(target.tracking)
    target.workdir.mkdir(parents=True, exist_ok=True)
    storage = st.open_storage(target.storage)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    spec_json = json.dumps(spec.raw, sort_keys=True, default=str)
    budget = n_trials or spec.n_trials
    study = st.create_or_load(spec, storage, study_name)
    if study_name in existing:
        recorded = study.user_attrs.get(st.ATTR_SPEC)
        if recorded is not None and recorded != spec_json and not resume:
            raise UserError(f"study {study_name!r} exists with a different spec; pass --study NEW_NAME "
                            f"or `ssa-tune resume {study_name}`", spec.path, "name")
        alive = st.driver_alive(study)
        if alive:
            raise UserError(f"study {study_name!r} is being run by pid {alive['pid']} on this host", field="study")
    if not (resume and st.ATTR_SPEC in study.user_attrs):  # resume keeps the spec the study was made with
        study.set_user_attr(st.ATTR_SPEC, spec_json)
    study.set_user_attr(st.ATTR_SPEC_PATH, spec.path)
    study.set_user_attr(st.ATTR_DRIVER, {"host": socket.gethostname(), "pid": os.getpid()})
    study.set_user_attr("ssa_tune.n_trials", budget)

    _init_ray(address, target.workdir)  # early: its worker processes start while the tracking store is set up
    tracker = Tracker(target.tracking, study_name, target.workdir / "mlartifacts")
    # a previous driver that died left RUNNING trials: FAIL them (and their MLflow runs), retry their params
    orphans = st.fail_orphans(study, "killed: the driver stopped while the trial ran")
    if orphans:
        tracker.kill_runs([t.user_attrs[st.T_RUN] for t in orphans if st.T_RUN in t.user_attrs],
                          "killed: the driver stopped while the trial ran")
        retried = st.enqueue_retries(study, orphans)
        out(f"resume: {len(orphans)} interrupted trial(s) marked FAIL, {retried} re-queued")
    parent = tracker.parent_run(study_name, study.user_attrs.get(st.ATTR_PARENT_RUN),
                                {"ssa_tune.storage": st.redact(target.storage)})
    study.set_user_attr(st.ATTR_PARENT_RUN, parent)
    study.set_user_attr(st.ATTR_EXPERIMENT, tracker.experiment_id)
    study.set_user_attr(st.ATTR_TRACKING, target.tracking)
    tracker.log_study(parent, params={f"spec.{k}": v for k, v in _flat(spec.raw).items()},
                      tags={"ssa_tune.spec_path": spec.path})
    if spec.ssa is not None and spec.baseline and not study.trials:
        study.enqueue_trial(spec.baseline_params())

    out(f"study {study_name}: {st.budget_used(study)}/{budget} trials done; storage {st.redact(target.storage)}; "
        f"tracking {target.tracking}")
    started = time.monotonic()
    trials_before = len(study.trials)
    # trials that FAIL do not count toward the budget: run further rounds for them, a bounded number
    for _ in range(3):
        remaining = budget - st.budget_used(study)
        if remaining <= 0:
            break
        time_left = None
        if spec.time_limit_s is not None:
            time_left = spec.time_limit_s - (time.monotonic() - started)
            if time_left <= 0:
                break
        failed_before = st.counts(study)["failed"]
        _fit(spec, target, study, storage, tracker, parent, remaining, time_left, out)
        if st.counts(study)["failed"] == failed_before:
            break  # short of the budget without failures: the time limit ended it
    summary = status(study, target)
    summary["new_trials"] = len(study.trials) - trials_before
    best = summary["best"]
    metrics = {"best_value": best["value"]} if best and isinstance(best["value"], (int, float)) else {}
    metrics.update({f"trials_{k}": v for k, v in summary["trials"].items()})
    tracker.log_study(parent, metrics=metrics,
                      tags={"ssa_tune.best_trial": best["number"]} if best else None)
    tracker.finish_study(parent)
    study.set_user_attr(st.ATTR_DRIVER, None)
    return summary


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not prefix.startswith("search"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return {k: v for k, v in out.items() if k not in ("storage", "tracking")}  # URLs may carry passwords


def _fit(spec: JobSpec, target: Target, study, storage, tracker: Tracker, parent: str,
         num_samples: int, time_budget: float | None, out: Callable[[str], None]) -> None:
    from ray import tune

    study_name = study.study_name
    max_steps = spec.max_steps
    if spec.train.get("max_tokens") is not None:
        max_steps = 10**9  # a token budget: only the scheduler's own max decides
    progress = _progress_callback(spec, out)
    metrics = [o.metric for o in spec.objectives]
    modes = ["min" if o.direction == "minimize" else "max" for o in spec.objectives]
    search = _searcher_class()(
        spec=spec, tracker=tracker, parent_run=parent, max_steps=max_steps, on_done=progress.done,
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        sampler=st.make_sampler(spec, offset=len(study.trials)), storage=storage, study_name=study_name)
    cpus, gpus = float(spec.resources["cpus_per_trial"]), float(spec.resources["gpus_per_trial"])
    ctx = {"spec": json.dumps(spec.raw, default=str), "spec_path": spec.path, "cpus": cpus, "gpus": gpus,
           "tracking": target.tracking, "storage": target.storage, "study": study_name}
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx), {"cpu": cpus, "gpu": gpus})
    single = len(metrics) == 1
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=_scheduler(spec, max_steps) if single else None,
            num_samples=num_samples,
            max_concurrent_trials=int(spec.resources["max_concurrent"]),
            reuse_actors=True,
            time_budget_s=time_budget,
        ),
        run_config=tune.RunConfig(
            name=f"{study_name}-{int(time.time())}",
            storage_path=str(target.workdir / "ray_results"),
            verbose=0,
            callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    tuner.fit()


# ----------------------------------------------------------------------------------- reading a study


def status(study, target: Target) -> dict[str, Any]:
    best = st.best_trial(study)
    return {
        "study": study.study_name,
        "storage": st.redact(target.storage),
        "tracking_uri": target.tracking,
        "n_trials": study.user_attrs.get("ssa_tune.n_trials"),
        "trials": st.counts(study),
        "best": None if best is None else {
            "number": best.number,
            "value": best.value if len(best.values) == 1 else best.values,
            "params": dict(best.params),
        },
    }


# ------------------------------------------------------------------------------------- robustness stage


ROBUSTNESS_DEFAULTS = {"top_k": 3, "seeds": 3, "penalty": 1.0, "long_context": None, "noise": None, "constraint": False}
ATTR_ROBUSTNESS = "ssa_tune.robustness"


def _variant_spec(spec: JobSpec, dataset_override: dict | None) -> JobSpec:
    """The spec with another dataset (an override with `kind` replaces it, one without is merged)."""
    if not dataset_override:
        return spec
    dataset = dict(dataset_override) if "kind" in dataset_override else {**spec.dataset, **dataset_override}
    raw = {**spec.raw, "dataset": dataset}
    return validate(raw, spec.path, check_data=False)


def _robust_job(spec_json: str, spec_path: str, params: dict, cpus: float, gpus: float, tracking: str,
                run_id: str) -> dict:
    spec = validate(json.loads(spec_json), spec_path, check_data=False)
    try:
        result = execute(spec, params, cpus, gpus, report=lambda m: None, tracking_uri=tracking, run_id=run_id)
        return {"ok": True, "metrics": result.metrics}
    except Exception as e:
        return {"ok": False, "reason": failure_reason(e)}


def run_robustness(study, spec: JobSpec, target: Target, out: Callable[[str], None] = print,
                   address: str | None = None) -> dict[str, Any]:
    """Re-train the top-k configs and the baseline with fresh seeds (in parallel on Ray), on the study's
    dataset and on the optional long-context / noise variants; rank by the robust score."""
    import ray

    from . import analyse

    r = {**ROBUSTNESS_DEFAULTS, **(spec.robustness or {})}
    objective = spec.objectives[0]
    top = analyse.pick_top(study, r["top_k"])
    if not top:
        raise UserError(f"study {study.study_name!r} has no complete trial to re-run", field="STUDY")
    configs = {f"trial-{t.number}": dict(t.params) for t in top}
    baseline_id = None
    if spec.ssa is not None or any(p.name == "ssa.enabled" for p in spec.search):
        # the verdict needs both sides: the best SSA trial and the best baseline trial always take part
        sign = 1 if objective.direction == "minimize" else -1
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and math.isfinite(t.values[0])]
        ssa_trials = [t for t in done if t.params.get("ssa.enabled", spec.ssa is not None) is True]
        if ssa_trials:
            b = min(ssa_trials, key=lambda t: sign * t.values[0])
            configs.setdefault(f"trial-{b.number}", dict(b.params))
        base = [t for t in done if t.params.get("ssa.enabled") is False]
        if base:
            b = min(base, key=lambda t: sign * t.values[0])
            baseline_id = f"trial-{b.number}"
            configs.setdefault(baseline_id, dict(b.params))
        else:
            baseline_id = "baseline"
            configs[baseline_id] = spec.baseline_params()
    seeds = [10_000 + i for i in range(int(r["seeds"]))]  # fresh seeds, never the study's own
    variants = {"main": spec}
    for name in ("long_context", "noise"):
        if r.get(name):
            variants[name] = _variant_spec(spec, r[name])
    tracker = Tracker(target.tracking, study.study_name, target.workdir / "mlartifacts")
    parent = study.user_attrs.get(st.ATTR_PARENT_RUN) or tracker.parent_run(study.study_name, None, {})
    _init_ray(address, target.workdir)
    cpus, gpus = float(spec.resources["cpus_per_trial"]), float(spec.resources["gpus_per_trial"])
    task = ray.remote(_robust_job)
    jobs = []
    for vname, vspec in variants.items():
        vjson = json.dumps(vspec.raw, default=str)
        for cid, params in configs.items():
            for seed in seeds:
                p = {**params, "train.seed": seed}
                d, m, t, s = vspec.trial_config(p)
                run_id = tracker.child_run(
                    parent, study.study_name, None, trial_params(d, m, t, s), role="robustness",
                    tags={"ssa_tune.config": cid, "ssa_tune.seed": seed, "ssa_tune.variant": vname},
                    name=f"robust-{cid}-{vname}-s{seed}")
                jobs.append({"config": cid, "variant": vname, "seed": seed, "run_id": run_id,
                             "args": (vjson, spec.path, p, cpus, gpus, target.tracking, run_id)})
    out(f"robustness: {len(configs)} configs x {len(seeds)} seeds x {len(variants)} variant(s) = {len(jobs)} runs")
    results: dict[int, dict] = {}
    limit = int(spec.resources["max_concurrent"])
    queue = list(range(len(jobs)))
    running: dict[Any, int] = {}
    while queue or running:
        while queue and len(running) < limit:
            i = queue.pop(0)
            running[task.options(num_cpus=cpus, num_gpus=gpus).remote(*jobs[i]["args"])] = i
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            i = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as e:  # the worker died
                results[i] = {"ok": False, "reason": f"worker died: {type(e).__name__}"}
            j = jobs[i]
            res = results[i]
            state = "COMPLETE" if res["ok"] else "FAIL"
            tracker.finish_trial(j["run_id"], state, res.get("reason"))
            value = res["metrics"].get(objective.metric) if res["ok"] else None
            out(f"  robust {j['config']:<10} {j['variant']:<12} seed {j['seed']}: {objective.metric}="
                f"{_fmt(value)}" + ("" if res["ok"] else f" ({res['reason']})"))

    def collect(variant: str, metric: str) -> dict[str, list]:
        table: dict[str, list] = {cid: [] for cid in configs}
        for i, j in enumerate(jobs):
            if j["variant"] == variant:
                res = results[i]
                table[j["config"]].append(res["metrics"].get(metric) if res["ok"] else None)
        return table

    main = collect("main", objective.metric)
    summary = analyse.robust_summary(main, objective.direction, float(r["penalty"]))
    long_metric = None
    flags: dict[str, bool] = {}
    long_table: dict[str, list] = {}
    if "long_context" in variants:
        probe = _variant_spec(spec, r["long_context"])
        long_metric = "passkey_acc" if probe.dataset["kind"] == "passkey" else "val_acc"
        long_table = collect("long_context", long_metric)
    elif spec.dataset["kind"] == "passkey":
        long_metric, long_table = "passkey_acc", collect("main", "passkey_acc")
    if long_table and baseline_id:
        flags = analyse.long_range_flags(long_table, baseline_id)
    noise_table = collect("noise", objective.metric) if "noise" in variants else {}
    eligible = [c for c in summary if summary[c]["score"] is not None and not (r["constraint"] and flags.get(c))]
    winner = eligible[0] if eligible else None
    costs = {}
    ssa_ids = [c for c in summary if configs[c].get("ssa.enabled", spec.ssa is not None) and summary[c]["score"] is not None]
    best_ssa = ssa_ids[0] if ssa_ids else None
    verdict = None
    if baseline_id and best_ssa:
        for metric in ("latency_ms_per_token", "peak_mem_mb", "n_params", "tokens_per_s"):
            table = collect("main", metric)
            s_vals = [v for v in table[best_ssa] if v is not None]
            b_vals = [v for v in table[baseline_id] if v is not None]
            if s_vals and b_vals:
                costs[metric] = {"ssa": statistics.fmean(s_vals), "baseline": statistics.fmean(b_vals)}
        verdict = analyse.verdict(main[best_ssa], main[baseline_id], objective.direction, objective.metric, costs)
        verdict["ssa_config"], verdict["baseline_config"] = best_ssa, baseline_id
    report = {
        "objective": objective.metric, "direction": objective.direction, "penalty": float(r["penalty"]),
        "seeds": seeds, "configs": configs, "baseline": baseline_id, "summary": summary,
        "rank_stability_kendall_tau": analyse.rank_stability(main),
        "long_context": {"metric": long_metric, "values": long_table, "flagged": flags,
                         "constraint": bool(r["constraint"])} if long_metric else None,
        "noise": {"metric": objective.metric, "values": noise_table} if noise_table else None,
        "winner": winner, "best_ssa": best_ssa, "verdict": verdict,
    }
    study.set_user_attr(ATTR_ROBUSTNESS, json.loads(json.dumps(report, default=str)))
    if winner:
        w = summary[winner]
        out(f"robust winner: {winner} ({objective.metric} {w['mean']:.4f} +- {w['std']:.4f} over {w['seeds']} seeds)")
    if verdict:
        out(f"verdict: {verdict['answer']}")
    return report
