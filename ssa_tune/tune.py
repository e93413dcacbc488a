"""Ray: the cluster connection, what a trial asks of it, and Ray Tune executing the trials of an Optuna study.

Every Ray Tune and Ray core call of the study is in this module (Ray's API moves between releases; the
version is pinned); job submission is `jobs.py`. Early stopping has one owner, the Ray scheduler (ASHA by
default, one instance per arm so arms never stop each other's trials); Optuna's own pruner is off, and a trial
the scheduler stopped is told to Optuna as PRUNED. Workers never write to the study or to MLflow: they report
to the driver, which tells Optuna and feeds the MLflow mirror.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

from . import study as st
from .errors import UserError
from .spec import ARMS, JobSpec, validate
from .trial import KEY_ARM, KEY_NUMBER, KEY_TRIAL_ID, execute, failure_reason, trial_params

# the result keys of a trial that are Ray Tune's own bookkeeping, not metrics of ours
_RAY_KEYS = {"done", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "date", "pid",
             "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "trial_id",
             "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "timesteps_total", "episodes_total",
             "timesteps_since_restore", "config", "ssa_tune.node_id", "ssa_tune.entered", "ssa_tune.wall",
             "precision"}
NODE_KEY = "ssa_tune.node_id"
# wall-clock times (time.time()) the worker adds to each report: when the trainable was entered, and when the
# report was made; benchmarks/tuning.py's hand-over profile reads them, nothing else does
ENTERED_KEY, WALL_KEY = "ssa_tune.entered", "ssa_tune.wall"


def _ours(key: str) -> bool:
    """A metric the trial reported, not one Ray adds (its bookkeeping, the flattened `config/...`)."""
    return key not in _RAY_KEYS and not key.startswith("config/")

KEY_ROBUST, KEY_VARIANT = "ssa_tune.robust", "ssa_tune.variant"  # a robustness run (not an Optuna trial)


# ----------------------------------------------------------------------------------------------- cluster


def _quiet_ray() -> None:
    """Our own progress lines replace Ray's tables and its end-of-run error banner."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    # Ctrl-C must interrupt the study (KeyboardInterrupt: the driver fails and re-queues its running trials,
    # stores no partial robustness stage, exits 130): Tune's own SIGINT handler would instead end `fit()`
    # normally, as if the budget were spent
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    for name in ("ray.tune", "ray.air", "ray.train", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def auth_from_token_file() -> None:
    """Use Ray's token authentication when a token is at hand (~/.ray/auth_token, $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH): Ray's clients only send it with RAY_AUTH_MODE=token, which nobody should have to
    export by hand. An explicit RAY_AUTH_MODE is left alone."""
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "/nonexistent").is_file() \
            or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def in_ray_job() -> bool:
    """True when this process is the entrypoint of a Ray job (`ssa-tune submit`)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


# The job's working dir as the entrypoint found it. Ray may unpack that folder again under the same path
# while the job runs (when several nodes share one disk), which leaves the process's cwd a deleted
# directory: everything that needs the folder uses this path, never os.getcwd().
_START_DIR = os.getcwd() if in_ray_job() else None


def job_dir() -> str:
    global _START_DIR
    if _START_DIR is None:
        _START_DIR = os.getcwd()
    return _START_DIR


def init_ray(address: str | None = None) -> None:
    """Connect to Ray: the cluster at `address` (or $RAY_ADDRESS, as inside a Ray job), else a new local one.

    A local run always starts its own instance (`address="local"`): a Ray cluster someone started on this
    machine must not silently take the study's trials."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _quiet_ray()
    if address != "local":
        auth_from_token_file()  # before Ray is imported: its C++ side reads RAY_AUTH_MODE once
    import ray

    if ray.is_initialized():
        return
    # inside a Ray job, Ray merges this with the job's own runtime env (its working dir with the spec and data)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "workers.setup.setup"}
    kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR",
                          "runtime_env": runtime_env}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **kw)
        else:  # an existing cluster: no CPU/GPU counts may be given
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).strip().splitlines()[0]}", field="address") from None
    try:
        os.getcwd()
    except FileNotFoundError:  # inside a job Ray may unpack the working dir anew: step back into it
        os.chdir(job_dir())


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster: {"node_id", "ip", "resources"}."""
    import ray

    return [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"), "resources": dict(n.get("Resources", {}))}
            for n in ray.nodes() if n.get("Alive")]


def _fmt_request(request: dict[str, float]) -> str:
    def one(k, v):
        return f"memory {v / 2**30:.3g} GiB" if k == "memory" else f"{k} {v:g}"

    return ", ".join(one(k, v) for k, v in sorted(request.items()))


def unfit_reason(request: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no node can ever hold one trial, or None when one can."""
    if any(all(n["resources"].get(k, 0.0) >= v - 1e-9 for k, v in request.items()) for n in nodes):
        return None
    have = "; ".join(f"{n['ip']}: {_fmt_request({k: v for k, v in n['resources'].items() if k in request})}"
                     for n in nodes) or "no alive node"
    return f"one trial asks for {_fmt_request(request)}, but no node of the cluster has that ({have})"


def check_resources(spec: JobSpec, nodes: list[dict[str, Any]] | None = None) -> None:
    """A trial no node can ever hold is one line, not a wait forever (unless the spec says the cluster
    autoscales: then the wait is watched and bounded while the study runs)."""
    if spec.resources.get("autoscale"):
        return
    reason = unfit_reason(spec.trial_resources(), cluster_nodes() if nodes is None else nodes)
    if reason:
        raise UserError(f"{reason}; lower resources.* or add a node (resources.autoscale: true to wait for one)",
                        spec.path, "resources")


# ------------------------------------------------------------------------------------------- the worker


def _trainable(config: dict, ctx: dict) -> None:
    """A Ray Tune function trainable: one Optuna trial. It reports to the driver only."""
    entered = time.time()
    import ray
    import ray.tune

    number = config[KEY_NUMBER]
    params = {k: v for k, v in config.items() if not k.startswith("ssa_tune.")}
    node = ray.get_runtime_context().get_node_id()
    try:
        raw = ctx["variants"][config[KEY_VARIANT]] if KEY_VARIANT in config else json.loads(ctx["spec"])
        spec = validate(raw, ctx["spec_path"], check_data=False, base_dir=os.environ.get("TUNE_ORIG_WORKING_DIR"))
        def report(m: dict) -> None:
            ray.tune.report({**m, NODE_KEY: node, ENTERED_KEY: entered, WALL_KEY: time.time()})

        execute(spec, params, ctx["cpus"], ctx["gpus"], report=report)
    except Exception as e:
        # the reason travels in the error, which the driver reads back (see `_error_reason`)
        raise RuntimeError(f"trial {number} failed: {failure_reason(e)}") from None


def _error_reason(trial) -> tuple[str, bool]:
    """(reason, lost) of a trial Ray Tune marked ERROR; `lost` when the infrastructure, not the trial, failed
    (its worker process or node died), which is worth one re-run."""
    from ray import cloudpickle
    from ray.exceptions import RayActorError, RayTaskError

    err = None
    try:  # Tune writes the error to the trial's staging folder on the driver first, then syncs it
        path = trial.pickled_error_file if trial is not None else None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                err = cloudpickle.load(f)
        elif trial is not None:
            err = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an unreadable error file: say so below
        err = None
    if err is None:
        return "the trial's worker failed (no error recorded)", True
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        text = str(cause) if cause is not None else str(err).strip().splitlines()[-1]
        _, sep, reason = text.partition(" failed: ")
        return (reason if sep else text.strip().splitlines()[0]), False
    if isinstance(err, RayActorError) or "ActorDied" in type(err).__name__ or "NodeDied" in type(err).__name__:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"worker lost (its process or node died): {first[:300]}", True
    if "OutOfMemory" in type(err).__name__:
        return "out of memory: Ray's memory monitor killed the worker", False
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {first[:300]}", False


# ------------------------------------------------------------------------------------------ the searcher


def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search import Searcher

    class StudySearch(Searcher):
        """Ray Tune's searcher on the Optuna study: each suggestion is a trial asked of one arm's sampler,
        under the study lock, while the arm has budget left (counted in the storage, so several drivers
        share one budget). Scheduler stops are told to Optuna as PRUNED, failures as FAIL with their reason;
        a trial lost with its worker is re-run once. When the search is over (and `make_plan` is given) the
        robustness stage's runs follow on the same workers, as long as its plan hands out jobs."""

        def __init__(self, *, spec: JobSpec, study, storage_url: str, budgets: dict[str, int], driver: str,
                     mirror, trials: dict, on_done: Callable, max_failures: int, make_plan: Callable | None,
                     time_limit_s: float | None, search_deadline: float | None = None):
            super().__init__(metric=None, mode=None)  # the objectives are read here, not by Ray
            self._make_plan, self.plan = make_plan, None
            limits = [d for d in (None if time_limit_s is None else time.monotonic() + time_limit_s,
                                  search_deadline) if d is not None]
            self._deadline = min(limits) if limits else None
            self._robust: dict[str, dict] = {}  # Tune trial id -> robustness job
            self._history: dict[str, list] = {}  # Tune trial id -> (tokens, objective) of a robustness run
            self._spec, self._study, self._url = spec, study, storage_url
            self._budgets, self._driver, self._mirror = budgets, driver, mirror
            self._tune_trials, self._on_done = trials, on_done
            self._max_failures = max_failures
            self._failures = 0
            self._ot: dict[str, Any] = {}  # Tune trial id -> Optuna trial
            self._keys: dict[str, str] = {}  # Tune trial id -> mirror key
            self._last: dict[str, dict] = {}
            self._reported: dict[str, set[int]] = {}
            self._done: set[str] = set()
            self._quiet_until = 0.0
            self._next_sweep = 0.0
            self.objectives = spec.objectives

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def __getstate__(self):
            # Ray pickles the tuner's settings for a restore of its own, which ssa-tune never uses (the study's
            # storage is the state); the live handles (MLflow mirror thread, study, callbacks) stay out of it
            live = ("_mirror", "_on_done", "_study", "_tune_trials")
            return {k: v for k, v in self.__dict__.items() if k not in live}

        # ------------------------------------------------------------ asking

        def suggest(self, trial_id: str):
            now = time.monotonic()
            if now < self._quiet_until:
                return None
            if self.plan is not None:
                return self._suggest_robust(trial_id)
            if now >= self._next_sweep:
                self._next_sweep = now + 15.0
                self._sweep()
            with st.study_lock(self._url, self._study.study_name):
                arm = st.next_arm(self._study, self._budgets)
                over = self._deadline is not None and now > self._deadline  # budget.time_limit_s
                if arm == st.FINISHED or over or self._failures >= self._max_failures:
                    return self._search_over(trial_id)
                if arm is None:  # the rest of the budget is running, here or under another driver
                    if not set(self._ot) - self._done:
                        return Searcher.FINISHED  # all of it elsewhere: those drivers finish it
                    self._quiet_until = now + 1.0
                    return None
                ot = st.ask_arm(self._study, self._spec, arm, self._driver)
            try:
                params = st.suggest_all(ot, self._spec)
                dataset, model, train, ssa = self._spec.trial_config(params)
            except (ValueError, TypeError) as e:  # values that are valid alone but not together
                self._fail_unstarted(ot, arm, f"invalid combination of values: {e}")
                return None
            key = f"trial-{ot.number}"
            self._ot[trial_id], self._keys[trial_id] = ot, key
            self._mirror.create(key, key, trial_params(dataset, model, train, ssa),
                                {"ssa_tune.role": "trial", "ssa_tune.trial_number": ot.number, "ssa_tune.arm": arm})
            return {**params, KEY_NUMBER: ot.number, KEY_TRIAL_ID: ot._trial_id, KEY_ARM: arm}

        def _search_over(self, trial_id: str):
            """No more search trials: wait for ours to finish, then hand over to the robustness plan."""
            if set(self._ot) - self._done:
                self._quiet_until = time.monotonic() + 0.5
                return None
            make, self._make_plan = self._make_plan, None
            if make is None or any(t.state == TrialState.RUNNING for t in self._study.get_trials(deepcopy=False)):
                return Searcher.FINISHED  # no stage, or another driver still runs the search (its driver runs it)
            self.plan = make(bool(self._ot))
            if self.plan is None:
                return Searcher.FINISHED
            return self._suggest_robust(trial_id)

        def _suggest_robust(self, trial_id: str):
            job = self.plan.next_job()
            if job is None:  # the next stage needs the runs still going
                self._quiet_until = time.monotonic() + 0.5
                return None
            if not isinstance(job, dict):
                return Searcher.FINISHED
            self._robust[trial_id] = job
            self._keys[trial_id] = job["key"]
            self._mirror.create(job["key"], job["key"], self.plan.mlflow_params(job),
                                {"ssa_tune.role": "robustness", "ssa_tune.stage": job["stage"],
                                 "ssa_tune.config": job["config"], "ssa_tune.seed": job["seed"],
                                 "ssa_tune.variant": job["variant"], "ssa_tune.arm": job["arm"]})
            return {**job["params"], KEY_NUMBER: job["key"], KEY_ARM: job["arm"], KEY_ROBUST: job["key"],
                    KEY_VARIANT: job["variant"]}

        def _robust_done(self, trial_id: str, result: dict | None, error: bool) -> None:
            job = self._robust.pop(trial_id)
            history = self._history.pop(trial_id, [])
            self._done.add(trial_id)
            last = self._last.pop(trial_id, None) or result or {}
            if error:
                res = {"ok": False, "reason": _error_reason(self._tune_trials.get(trial_id))[0]}
            elif float(last.get("progress", 0.0)) < 1.0:
                res = {"ok": False, "reason": "never finished (stopped before its end)"}
            else:
                res = {"ok": True, "metrics": {k: v for k, v in last.items() if _ours(k)}, "history": history}
            self._mirror.finish(job["key"], "COMPLETE" if res["ok"] else "FAIL", res.get("reason"))
            self.plan.record(job, res)

        def _fail_unstarted(self, ot, arm: str, reason: str) -> None:
            self._study._storage.set_trial_user_attr(ot._trial_id, st.T_REASON, reason)
            self._study.tell(ot, state=TrialState.FAIL)
            self._failures += 1
            key = f"trial-{ot.number}"
            self._mirror.create(key, key, dict(ot.params), {"ssa_tune.role": "trial", "ssa_tune.trial_number":
                                                             ot.number, "ssa_tune.arm": arm})
            self._mirror.finish(key, "FAIL", reason)
            self._on_done(ot.number, "FAIL", None, reason, arm)

        def _sweep(self) -> None:
            """Trials whose driver is gone (killed, or silent on another host) become FAIL and are re-run once."""
            with st.study_lock(self._url, self._study.study_name):
                lost = st.fail_trials(self._study, st.orphans(self._study, self._driver),
                                      "killed: its driver stopped while the trial ran")
                if lost:
                    st.enqueue_retries(self._study, lost)
            for t in lost:
                self._mirror.finish(f"trial-{t.number}", "FAIL", "killed: its driver stopped while the trial ran",
                                    status="KILLED")

        # ------------------------------------------------------------ results

        def on_trial_result(self, trial_id: str, result: dict):
            self._result(trial_id, result)

        def _result(self, trial_id: str, result: dict) -> None:
            if trial_id in self._robust:
                self._last[trial_id] = result
                value, tokens = result.get(self.plan.objective.metric), result.get("tokens")
                if result.get("step") is not None and tokens is not None and isinstance(value, (int, float)):
                    hist = self._history.setdefault(trial_id, [])
                    if not hist or hist[-1][0] != tokens:  # the final result can arrive twice
                        hist.append((float(tokens), float(value)))
                if result.get("step") is not None:
                    self._mirror.metrics(self._keys[trial_id], {k: v for k, v in result.items()
                                                                if _ours(k)}, int(result["step"]))
                return
            ot = self._ot.get(trial_id)
            if ot is None or trial_id in self._done:
                return
            step = result.get("step")
            if step is None:
                return
            seen = self._reported.setdefault(trial_id, set())
            if int(step) in seen:  # the final result can arrive twice (result, then completion)
                return
            seen.add(int(step))
            self._last[trial_id] = result
            if not seen - {int(step)}:  # the first result: where the trial runs
                node = {"node_id": result.get(NODE_KEY), "ip": result.get("node_ip"),
                        "hostname": result.get("hostname")}
                self._study._storage.set_trial_user_attr(ot._trial_id, st.T_NODE, node)
                self._study._storage.set_trial_user_attr(ot._trial_id, st.T_PRECISION, result.get("precision"))
                self._mirror.tags(self._keys[trial_id], {"ssa_tune.node_id": node["node_id"],
                                                         "ssa_tune.node_ip": node["ip"],
                                                         "ssa_tune.precision": result.get("precision")})
            self._mirror.metrics(self._keys[trial_id], {k: v for k, v in result.items() if _ours(k)},
                                 int(step))
            if len(self.objectives) == 1:
                v = result.get(self.objectives[0].metric)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    ot.report(float(v), int(step))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._robust:
                if result and self._last.get(trial_id) is not result:
                    self._result(trial_id, result)
                self._robust_done(trial_id, result, error)
                return
            ot = self._ot.get(trial_id)
            if ot is None or trial_id in self._done:
                return
            if result:
                self._result(trial_id, result)
            result = self._last.get(trial_id) or result or {}
            storage = self._study._storage
            arm = st.arm_of(ot)
            metrics = [o.metric for o in self.objectives]
            values = [result.get(m) for m in metrics] if result else None
            lost = False
            if error:
                reason, lost = _error_reason(self._tune_trials.get(trial_id))
                state = "FAIL"
            elif not result:
                state, reason = "FAIL", "never started: the study stopped before a node took it"
            elif not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
                state = "FAIL"
                missing = [m for m, v in zip(metrics, values or [None] * len(metrics)) if v is None]
                reason = (f"objective {', '.join(missing)} not reported" if missing else "no finite objective reported")
            elif float(result.get("progress", 0.0)) < 1.0:
                state, reason = "PRUNED", None
                storage.set_trial_user_attr(ot._trial_id, st.T_PRUNED_AT, int(result["step"]))
            else:
                state, reason = "COMPLETE", None
            ts = {"FAIL": TrialState.FAIL, "PRUNED": TrialState.PRUNED, "COMPLETE": TrialState.COMPLETE}[state]
            if reason:
                storage.set_trial_user_attr(ot._trial_id, st.T_REASON, reason)
            if result:  # every metric's last value, so rules (--where) can read them without MLflow
                final = {k: float(v) for k, v in result.items() if _ours(k) and isinstance(v, (int, float))
                         and not isinstance(v, bool) and math.isfinite(v) and not k.startswith(("layer", "probe."))}
                storage.set_trial_user_attr(ot._trial_id, st.T_FINAL, final)
            # Optuna takes no value with FAIL, and records a PRUNED trial's last intermediate value itself
            told = None if state != "COMPLETE" else (values[0] if len(values) == 1 else values)
            try:
                self._study.tell(ot, told, state=ts)
            except Exception as e:  # noqa: BLE001 - e.g. another driver already failed it as an orphan
                reason = reason or f"could not record the result: {e}"
            self._done.add(trial_id)
            if state == "FAIL":
                self._failures += 1
                if lost:
                    with st.study_lock(self._url, self._study.study_name):
                        st.enqueue_retries(self._study, [storage.get_trial(ot._trial_id)])
            self._mirror.finish(self._keys[trial_id], state, reason,
                                int(result["step"]) if state == "PRUNED" else None)
            self._on_done(ot.number, state, values, reason, arm)

        def close_unfinished(self, reason: str) -> None:
            """Trials asked but never told (Ray stopped before they ran): FAIL with `reason`."""
            for trial_id in list(self._robust):
                self._robust_done(trial_id, None, True)
            for trial_id in list(set(self._ot) - self._done):
                ot = self._ot[trial_id]
                self._study._storage.set_trial_user_attr(ot._trial_id, st.T_REASON, reason)
                try:
                    self._study.tell(ot, state=TrialState.FAIL)
                except Exception:  # noqa: BLE001 - another driver failed it already
                    pass
                self._done.add(trial_id)
                self._mirror.finish(self._keys[trial_id], "FAIL", reason)

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: the study's storage is the state, and resume reads it from there."""

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StudySearch


# ------------------------------------------------------------------------------------------ the scheduler


def _arm_scheduler(spec: JobSpec, max_t: float, time_attr: str, grace: float):
    """Early stopping within each arm: one scheduler per arm, each seeing only its own arm's trials."""
    from ray.tune.schedulers import (ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule,
                                     TrialScheduler)

    s = spec.scheduler
    metric, mode = spec.scheduler_metric  # a metric of every evaluation (validated)
    om = {"metric": metric, "mode": mode}

    def make():
        if s["kind"] == "asha":
            return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=min(grace, max_t),
                                 reduction_factor=s["reduction_factor"], **om)
        if s["kind"] == "hyperband":
            # stopping-only Hyperband, as Optuna's HyperbandPruner: successive-halving brackets of every grace
            # period from `grace` up, each trial in one bracket. (Ray's synchronous HyperBandScheduler pauses
            # trials and resumes them from checkpoints, which a trial here never writes: a resumed trial would
            # start again at step 0.)
            rf = s["reduction_factor"]
            g = min(grace, max_t)
            brackets = max(1, int(math.floor(math.log(max(max_t / g, 1.0), rf) + 1e-9)) + 1)
            return AsyncHyperBandScheduler(time_attr=time_attr, max_t=max_t, grace_period=g, reduction_factor=rf,
                                           brackets=brackets, **om)
        if s["kind"] == "median":
            return MedianStoppingRule(time_attr=time_attr, grace_period=grace, min_samples_required=3, **om)
        return FIFOScheduler()

    if s["kind"] == "none":
        return FIFOScheduler()

    class ArmScheduler(TrialScheduler):
        def __init__(self):
            super().__init__()
            self.arms = {arm: make() for arm in spec.arms}
            self.fifo = FIFOScheduler()
            self._metric, self._mode = om["metric"], om["mode"]

        def _of(self, trial):
            if KEY_ROBUST in trial.config:  # robustness runs train to their end
                return self.fifo
            return self.arms.get(trial.config.get(KEY_ARM)) or next(iter(self.arms.values()))

        def set_search_properties(self, metric, mode, **kw) -> bool:
            return True

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self._of(trial).on_trial_error(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

        def choose_trial_to_run(self, tune_controller):
            for scheduler in (*self.arms.values(), self.fifo):  # every arm's, not the first arm's alone
                trial = scheduler.choose_trial_to_run(tune_controller)
                if trial is not None:
                    return trial
            return None

        def debug_string(self) -> str:
            return "; ".join(f"{a}: {s.debug_string()}" for a, s in self.arms.items())

    return ArmScheduler()


# -------------------------------------------------------------------------------------- progress, waiting


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _callbacks(spec: JobSpec, study, out: Callable[[str], None], registry: dict):
    from ray.tune import Callback
    from ray.tune.experiment import Trial

    objective = spec.objectives[0]
    sign = 1 if objective.direction == "minimize" else -1

    class Progress(Callback):
        """A live view: one line per evaluation (throttled) and per finished trial, with each arm's best; and
        the watch on trials waiting for resources (with `resources.autoscale`), which has a limit."""

        def __init__(self):
            self.best: dict[str, tuple[float, int]] = {}
            self.last_print = 0.0
            self.running: dict[str, str] = {}
            self.waiting_since: float | None = None
            self.gave_up: str | None = None
            self._last_check = 0.0

        def on_trial_start(self, iteration, trials, trial, **info):
            registry[trial.trial_id] = trial
            if trial.config.get(KEY_ROBUST) is None:
                arm = trial.config.get(KEY_ARM, "")
                label = f"{arm:<8} " if len(spec.arms) > 1 else ""
                out(f"  trial {trial.config.get(KEY_NUMBER, '?'):>3} {label}started")

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

        def on_step_begin(self, iteration, trials, **info):
            if not spec.resources.get("autoscale"):
                return
            now = time.monotonic()
            if now - self._last_check < 2.0:
                return
            self._last_check = now
            pending = [t for t in trials if t.status == Trial.PENDING]
            running = [t for t in trials if t.status == Trial.RUNNING]
            if pending and not running:
                if self.waiting_since is None:
                    self.waiting_since = now
                    study.set_user_attr(st.ATTR_WAITING, {"since": time.time(), "pending": len(pending),
                                                          "asks": spec.trial_resources()})
                    out(f"  waiting for resources: {len(pending)} trial(s) ask "
                        f"{_fmt_request(spec.trial_resources())} (limit {spec.resources['wait_for_resources_s']:g} s)")
                elif now - self.waiting_since > float(spec.resources["wait_for_resources_s"]):
                    self.gave_up = (f"waited {now - self.waiting_since:.0f} s for a node that can hold a trial "
                                    f"({_fmt_request(spec.trial_resources())}); none came")
            elif self.waiting_since is not None:
                self.waiting_since = None
                study.set_user_attr(st.ATTR_WAITING, None)

        def done(self, number, state, values, reason, arm):
            label = f"{arm:<8} " if len(spec.arms) > 1 else ""
            detail = f" ({reason})" if reason else ""
            if spec.multi_objective:  # no single best: every objective of the trial
                shown = "  ".join(f"{o.metric}={_fmt(v)}" for o, v in zip(spec.objectives, values or [None] * 9))
                out(f"  trial {number:>3} {label}{state:<8} {shown}{detail}")
                return
            v = values[0] if values else None
            best = self.best.get(arm)
            if state == "COMPLETE" and v is not None and (best is None or sign * v < sign * best[0]):
                self.best[arm] = (v, number)
            tail = "   ".join(f"best {a} #{b[1]} {objective.metric}={_fmt(b[0])}" for a, b in sorted(self.best.items()))
            out(f"  trial {number:>3} {label}{state:<8} {objective.metric}={_fmt(v)}{detail}   {tail}")

    from ray.tune.stopper import Stopper

    progress = Progress()

    class WaitLimit(Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return progress.gave_up is not None

    return progress, WaitLimit()


# ------------------------------------------------------------------------------------------------ fit


def portable_raw(spec: JobSpec) -> dict:
    """The spec as workers get it: inside a Ray job, paths of data shipped with the job are relative (each
    node unpacks the job's working dir at its own place; `validate(base_dir=...)` resolves them there)."""
    from pathlib import Path

    return spec.relative_raw(Path(job_dir())) if in_ray_job() else spec.raw


def fit(spec: JobSpec, study, storage_url: str, workdir, mirror, driver: str, budgets: dict[str, int],
        out: Callable[[str], None], make_plan: Callable | None = None, search_deadline: float | None = None):
    """Run the study's trials on Ray Tune until every arm's budget is used (or budget.time_limit_s, or the
    `search_deadline` (time.monotonic) passed), then, with `make_plan`, the robustness stage's runs on the same
    workers; returns that stage's plan (or None)."""
    from ray import tune

    time_attr, max_t, grace = "progress", 1.0, _grace_fraction(spec)
    trials: dict[str, Any] = {}
    progress, stopper = _callbacks(spec, study, out, trials)
    search = _searcher_class()(spec=spec, study=study, storage_url=storage_url, budgets=budgets, driver=driver,
                               mirror=mirror, trials=trials, on_done=progress.done,
                               max_failures=2 * sum(budgets.values()) + 2, make_plan=make_plan,
                               time_limit_s=spec.time_limit_s, search_deadline=search_deadline)
    cpus, gpus = float(spec.resources["cpus_per_trial"]), float(spec.resources["gpus_per_trial"])
    variants = {}
    if spec.robustness:  # the long-context / noise variants the robustness stage may train
        from .robustness import variant_spec

        for name in ("long_context", "noise"):
            if spec.robustness.get(name):
                variants[name] = portable_raw(variant_spec(spec, spec.robustness[name]))
    variants["main"] = portable_raw(spec)
    ctx = {"spec": json.dumps(portable_raw(spec), default=str), "spec_path": spec.path, "cpus": cpus, "gpus": gpus,
           "variants": json.loads(json.dumps(variants, default=str))}
    request = spec.trial_resources()
    resources = {"cpu": cpus, "gpu": gpus}
    if "memory" in request:
        resources["memory"] = request["memory"]
    resources.update({k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")})
    trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=_arm_scheduler(spec, max_t, time_attr, grace),
            num_samples=-1,  # the searcher decides when the budget is spent
            max_concurrent_trials=int(spec.resources["max_concurrent"]),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{study.study_name}-{int(time.time())}",
            storage_path=str(workdir / "ray_results"),
            verbose=0,
            callbacks=[progress],
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    try:
        tuner.fit()
    finally:
        if progress.waiting_since is not None:
            study.set_user_attr(st.ATTR_WAITING, None)
    search.close_unfinished(progress.gave_up or "never started: the study stopped before a node took it")
    if progress.gave_up:
        raise UserError(progress.gave_up, spec.path, "resources")
    return search.plan


def _grace_fraction(spec: JobSpec) -> float:
    """The schedulers' time axis is each trial's own progress through its budget, in [0, 1] (reported with every
    evaluation), so trials that train for different lengths (a searched max_steps, batch size or token budget,
    a checkpoint's own sequence length) are compared at the same share of their training, and every trial
    reaches max_t = 1 exactly at its own end. The grace period `grace_steps` (default: one evaluation) becomes
    a share of the default configuration's steps; a hair below it, so that a rung falls on the evaluation it
    names despite floating-point rounding."""
    train = spec.train_config({})
    total = train.steps_for(int(spec.dataset.get("seq_len") or spec.model.get("seq_len") or 128))
    grace_steps = spec.scheduler.get("grace_steps") or train.eval_every
    return min(1.0, max(grace_steps / total - 1e-9, 1e-6))
