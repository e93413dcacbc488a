"""Early stopping within each arm: one Ray Tune scheduler per arm, each seeing only its own arm's trials, so
arms never stop each other's trials. Robustness runs train to their end (FIFO)."""

from __future__ import annotations

import math

from ray.tune.schedulers import (ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule,
                                 TrialScheduler)

from ..spec import JobSpec
from ..trial import KEY_ARM
from .trainable import KEY_ROBUST, failed


def arm_scheduler(spec: JobSpec, max_t: float, time_attr: str, grace: float) -> TrialScheduler:
    """The study's scheduler: FIFO with `scheduler.kind: none`, else one `make_one` per arm."""
    if spec.scheduler["kind"] == "none":
        return FIFOScheduler()
    return ArmScheduler(spec, max_t, time_attr, grace)


def make_one(spec: JobSpec, max_t: float, time_attr: str, grace: float) -> TrialScheduler:
    """One arm's scheduler of the kind the spec names, on the trials' progress axis."""
    s = spec.scheduler
    metric, mode = spec.scheduler_metric  # a metric of every evaluation (validated)
    om = {"metric": metric, "mode": mode}
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


class ArmScheduler(TrialScheduler):
    """Routes each trial to its arm's scheduler (robustness runs to a FIFO one); a trial to run is asked of
    every arm's scheduler, not the first arm's alone."""

    def __init__(self, spec: JobSpec, max_t: float, time_attr: str, grace: float):
        super().__init__()
        self.arms = {arm: make_one(spec, max_t, time_attr, grace) for arm in spec.arms}
        self.fifo = FIFOScheduler()
        self._metric, self._mode = spec.scheduler_metric

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
        if failed(result):  # a failure report: no evaluation, and the trial ends with it
            return TrialScheduler.CONTINUE
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if failed(result):  # to the arm's scheduler as what it is, a failed trial
            self._of(trial).on_trial_error(tune_controller, trial)
        else:
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
