"""Ray Tune's searcher on the Optuna study: what to run next (a trial of an arm with budget left, then the
robustness stage's runs), and what each result means for the study (reported values, PRUNED, FAIL with its
reason, a re-run of a trial lost with its worker)."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

from optuna.trial import TrialState
from ray.tune.search import Searcher

from .. import study as st
from ..compat import storage_of, trial_id_of
from ..spec import JobSpec
from ..trial import KEY_ARM, KEY_NUMBER, KEY_TRIAL_ID, trial_params
from .trainable import KEY_ROBUST, KEY_VARIANT, NODE_KEY, failed, ours


def error_reason(trial) -> tuple[str, bool]:
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
        if now < self._quiet_until and self._busy():
            return None  # a wait for our running trials: the storage is not asked again at once
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
        return {**params, KEY_NUMBER: ot.number, KEY_TRIAL_ID: trial_id_of(ot), KEY_ARM: arm}

    def _busy(self) -> bool:
        """A trial or robustness run of ours is still going. When none is, Tune blocks on this searcher, asking
        once a second (ray 2.60: TuneController._update_trial_queue sleeps 1 s between asks): a quiet period
        then only adds that second, at the end of the search and of every confirmation round."""
        return bool(set(self._ot) - self._done) or bool(self._robust)

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

    def _robust_done(self, trial_id: str, result: dict | None, error: bool, reason: str | None = None) -> None:
        job = self._robust.pop(trial_id)
        history = self._history.pop(trial_id, [])
        self._done.add(trial_id)
        last = self._last.pop(trial_id, None) or result or {}
        if reason:
            res = {"ok": False, "reason": reason}
        elif error:
            res = {"ok": False, "reason": error_reason(self._tune_trials.get(trial_id))[0]}
        elif float(last.get("progress", 0.0)) < 1.0:
            res = {"ok": False, "reason": "never finished (stopped before its end)"}
        else:
            res = {"ok": True, "metrics": {k: v for k, v in last.items() if ours(k)}, "history": history}
        self._mirror.finish(job["key"], "COMPLETE" if res["ok"] else "FAIL", res.get("reason"))
        self.plan.record(job, res)

    def _fail_unstarted(self, ot, arm: str, reason: str) -> None:
        ot.set_user_attr(st.T_REASON, reason)
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

    def _where(self, ot, trial_id: str, result: dict) -> None:
        """Record where the trial runs (its node and worker process), from its first report."""
        node = {"node_id": result.get(NODE_KEY), "ip": result.get("node_ip"), "hostname": result.get("hostname"),
                "pid": result.get("pid")}
        ot.set_user_attr(st.T_NODE, node)
        ot.set_user_attr(st.T_PRECISION, result.get("precision"))
        self._mirror.tags(self._keys[trial_id], {"ssa_tune.node_id": node["node_id"], "ssa_tune.node_ip": node["ip"],
                                                 "ssa_tune.precision": result.get("precision")})

    def _result(self, trial_id: str, result: dict) -> None:
        if failed(result):  # the trial's failure report (its reason is read at its completion), no evaluation
            ot = self._ot.get(trial_id)
            if ot is not None and trial_id not in self._done and not self._reported.get(trial_id):
                self._where(ot, trial_id, result)
            return
        if trial_id in self._robust:
            self._last[trial_id] = result
            value, tokens = result.get(self.plan.objective.metric), result.get("tokens")
            if result.get("step") is not None and tokens is not None and isinstance(value, (int, float)):
                hist = self._history.setdefault(trial_id, [])
                if not hist or hist[-1][0] != tokens:  # the final result can arrive twice
                    hist.append((float(tokens), float(value)))
            if result.get("step") is not None:
                self._mirror.metrics(self._keys[trial_id], {k: v for k, v in result.items()
                                                            if ours(k)}, int(result["step"]))
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
            self._where(ot, trial_id, result)
        self._mirror.metrics(self._keys[trial_id], {k: v for k, v in result.items() if ours(k)},
                             int(step))
        if len(self.objectives) == 1:
            v = result.get(self.objectives[0].metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                ot.report(float(v), int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        reason = failed(result)  # a trial that failed as trials do, its worker kept for the next one
        if reason:
            result = None  # its last evaluation (if any) stays its last result
        if trial_id in self._robust:
            if result and self._last.get(trial_id) is not result:
                self._result(trial_id, result)
            self._robust_done(trial_id, result, error, reason)
            return
        ot = self._ot.get(trial_id)
        if ot is None or trial_id in self._done:
            return
        if result:
            self._result(trial_id, result)
        result = self._last.get(trial_id) or result or {}
        arm = st.arm_of(ot)
        metrics = [o.metric for o in self.objectives]
        values = [result.get(m) for m in metrics] if result else None
        lost = False
        if reason:
            state = "FAIL"
        elif error:
            reason, lost = error_reason(self._tune_trials.get(trial_id))
            state = "FAIL"
        elif not result:
            state, reason = "FAIL", "never started: the study stopped before a node took it"
        elif not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            state = "FAIL"
            missing = [m for m, v in zip(metrics, values or [None] * len(metrics)) if v is None]
            reason = (f"objective {', '.join(missing)} not reported" if missing else "no finite objective reported")
        elif float(result.get("progress", 0.0)) < 1.0:
            state, reason = "PRUNED", None
            ot.set_user_attr(st.T_PRUNED_AT, int(result["step"]))
        else:
            state, reason = "COMPLETE", None
        ts = {"FAIL": TrialState.FAIL, "PRUNED": TrialState.PRUNED, "COMPLETE": TrialState.COMPLETE}[state]
        if reason:
            ot.set_user_attr(st.T_REASON, reason)
        if result:  # every metric's last value, so rules (--where) can read them without MLflow
            final = {k: float(v) for k, v in result.items() if ours(k) and isinstance(v, (int, float))
                     and not isinstance(v, bool) and math.isfinite(v) and not k.startswith(("layer", "probe."))}
            ot.set_user_attr(st.T_FINAL, final)
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
                    st.enqueue_retries(self._study, [storage_of(self._study).get_trial(trial_id_of(ot))])
        self._mirror.finish(self._keys[trial_id], state, reason,
                            int(result["step"]) if state == "PRUNED" else None)
        self._on_done(ot.number, state, values, reason, arm)

    def close_unfinished(self, reason: str) -> None:
        """Trials asked but never told (Ray stopped before they ran): FAIL with `reason`."""
        for trial_id in list(self._robust):
            self._robust_done(trial_id, None, True)
        for trial_id in list(set(self._ot) - self._done):
            ot = self._ot[trial_id]
            ot.set_user_attr(st.T_REASON, reason)
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
