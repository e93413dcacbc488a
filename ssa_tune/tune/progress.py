"""What the user sees while trials run (one line per evaluation, throttled, and per finished trial, with each
arm's best), and the bounded wait for resources (`resources.autoscale`)."""

from __future__ import annotations

import time
from typing import Callable

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.stopper import Stopper

from .. import study as st
from ..spec import JobSpec
from ..trial import KEY_ARM, KEY_NUMBER
from .cluster import fmt_request
from .trainable import KEY_ROBUST, failed


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


class Progress(Callback):
    """A live view: one line per evaluation (throttled) and per finished trial, with each arm's best; and the
    watch on trials waiting for resources (with `resources.autoscale`), which has a limit. `registry` gets
    every started Tune trial by id (the searcher reads a failed trial's error from it)."""

    def __init__(self, spec: JobSpec, study, out: Callable[[str], None], registry: dict):
        self.spec, self.study, self.out, self.registry = spec, study, out, registry
        self.objective = spec.objectives[0]
        self.sign = 1 if self.objective.direction == "minimize" else -1
        self.best: dict[str, tuple[float, int]] = {}
        self.last_print = 0.0
        self.running: dict[str, str] = {}
        self.waiting_since: float | None = None
        self.gave_up: str | None = None
        self._last_check = 0.0

    def _label(self, arm: str) -> str:
        return f"{arm:<8} " if len(self.spec.arms) > 1 else ""

    def on_trial_start(self, iteration, trials, trial, **info):
        self.registry[trial.trial_id] = trial
        if trial.config.get(KEY_ROBUST) is None:
            self.out(f"  trial {trial.config.get(KEY_NUMBER, '?'):>3} {self._label(trial.config.get(KEY_ARM, ''))}"
                     "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if failed(result):  # its FAIL line comes from the searcher
            return
        n = trial.config.get(KEY_NUMBER, "?")
        v = result.get(self.objective.metric)
        self.running[trial.trial_id] = f"#{n} step {result.get('step')}: {self.objective.metric}={fmt(v)}"
        now = time.monotonic()
        if now - self.last_print >= 2.0:
            self.last_print = now
            self.out("  running  " + " | ".join(self.running.values()))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)

    def on_step_begin(self, iteration, trials, **info):
        spec = self.spec
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
                self.study.set_user_attr(st.ATTR_WAITING, {"since": time.time(), "pending": len(pending),
                                                           "asks": spec.trial_resources()})
                self.out(f"  waiting for resources: {len(pending)} trial(s) ask "
                         f"{fmt_request(spec.trial_resources())} (limit {spec.resources['wait_for_resources_s']:g} s)")
            elif now - self.waiting_since > float(spec.resources["wait_for_resources_s"]):
                self.gave_up = (f"waited {now - self.waiting_since:.0f} s for a node that can hold a trial "
                                f"({fmt_request(spec.trial_resources())}); none came")
        elif self.waiting_since is not None:
            self.waiting_since = None
            self.study.set_user_attr(st.ATTR_WAITING, None)

    def done(self, number, state, values, reason, arm):
        """The line of a finished trial (the searcher calls it when it has told Optuna)."""
        label, objective = self._label(arm), self.objective
        detail = f" ({reason})" if reason else ""
        if self.spec.multi_objective:  # no single best: every objective of the trial
            shown = "  ".join(f"{o.metric}={fmt(v)}" for o, v in zip(self.spec.objectives, values or [None] * 9))
            self.out(f"  trial {number:>3} {label}{state:<8} {shown}{detail}")
            return
        v = values[0] if values else None
        best = self.best.get(arm)
        if state == "COMPLETE" and v is not None and (best is None or self.sign * v < self.sign * best[0]):
            self.best[arm] = (v, number)
        tail = "   ".join(f"best {a} #{b[1]} {objective.metric}={fmt(b[0])}" for a, b in sorted(self.best.items()))
        self.out(f"  trial {number:>3} {label}{state:<8} {objective.metric}={fmt(v)}{detail}   {tail}")


class WaitLimit(Stopper):
    """Ends the whole study when `progress` gave up waiting for resources."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.progress.gave_up is not None
