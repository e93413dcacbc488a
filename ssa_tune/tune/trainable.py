"""What runs on a Ray worker: one trial of the study, reporting to the driver (and the keys it adds).

This module imports neither Optuna, MLflow nor the driver's side of Ray Tune: a worker process that unpickles
the trainable loads only what training needs."""

from __future__ import annotations

import os
import time

from ..spec import validate
from ..errors import TrialFailed
from ..trial import KEY_NUMBER, execute, failure_reason

# the result keys of a trial that are Ray Tune's own bookkeeping, not metrics of ours
RAY_KEYS = {"done", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "date", "pid",
            "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "trial_id",
            "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "timesteps_total", "episodes_total",
            "timesteps_since_restore", "config", "ssa_tune.node_id", "ssa_tune.entered", "ssa_tune.wall",
            "precision", "ssa_tune.failed"}
NODE_KEY = "ssa_tune.node_id"
# wall-clock times (time.time()) the worker adds to each report: when the trainable was entered, and when the
# report was made; benchmarks/tuning.py's hand-over profile reads them, nothing else does
ENTERED_KEY, WALL_KEY = "ssa_tune.entered", "ssa_tune.wall"
KEY_ROBUST, KEY_VARIANT = "ssa_tune.robust", "ssa_tune.variant"  # a robustness run (not an Optuna trial)
# a trial that failed as trials do (diverged, out of memory: TrialFailed) ends with one report carrying this key,
# its reason, and returns: Ray Tune then hands the worker process to the next trial (reuse_actors), where an
# error would end the process and start a new one (~3 s of imports and set-up on a CPU worker). Any other
# exception still ends the process: its state is not known to be sound.
FAILED_KEY = "ssa_tune.failed"


def failed(result: dict | None) -> str | None:
    """The reason of a trial that ended with a failure report, else None."""
    return (result or {}).get(FAILED_KEY)


def ours(key: str) -> bool:
    """A metric the trial reported, not one Ray adds (its bookkeeping, the flattened `config/...`)."""
    return key not in RAY_KEYS and not key.startswith("config/")


def run_trial(config: dict, ctx: dict) -> None:
    """A Ray Tune function trainable: one Optuna trial. It reports to the driver only."""
    entered = time.time()
    import ray
    import ray.tune

    number = config[KEY_NUMBER]
    params = {k: v for k, v in config.items() if not k.startswith("ssa_tune.")}
    node = ray.get_runtime_context().get_node_id()
    try:
        raw = ctx["variants"][config.get(KEY_VARIANT, "main")]
        spec = validate(raw, ctx["spec_path"], check_data=False, base_dir=os.environ.get("TUNE_ORIG_WORKING_DIR"))

        def report(m: dict) -> None:
            ray.tune.report({**m, NODE_KEY: node, ENTERED_KEY: entered, WALL_KEY: time.time()})

        execute(spec, params, ctx["cpus"], ctx["gpus"], report=report)
    except TrialFailed as e:
        # Tune checks every result for its scheduler's metric: the failure report carries it, as not-a-number
        # (the study's scheduler, searcher and progress lines read the failure, never this value)
        metric = spec.scheduler_metric[0]
        ray.tune.report({FAILED_KEY: failure_reason(e), metric: float("nan"), NODE_KEY: node, ENTERED_KEY: entered,
                         WALL_KEY: time.time()})
    except Exception as e:
        # the reason travels in the error, which the driver reads back (see `searcher.error_reason`)
        raise RuntimeError(f"trial {number} failed: {failure_reason(e)}") from None
