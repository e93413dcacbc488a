"""`fit`: Ray Tune executing the study's trials (the searcher on the Optuna study, one scheduler per arm,
the progress lines) and then the robustness stage's runs on the same workers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .. import study as st
from ..errors import UserError
from ..robustness import variant_spec
from ..spec import JobSpec
from . import progress as _progress
from . import searcher as _searcher
from .cluster import in_ray_job, job_dir
from .scheduler import arm_scheduler
from .trainable import run_trial


def portable_raw(spec: JobSpec) -> dict:
    """The spec as workers get it: inside a Ray job, paths of data shipped with the job are relative (each
    node unpacks the job's working dir at its own place; `validate(base_dir=...)` resolves them there)."""
    return spec.relative_raw(Path(job_dir())) if in_ray_job() else spec.raw


def fit(spec: JobSpec, study, storage_url: str, workdir, mirror, driver: str, budgets: dict[str, int],
        out: Callable[[str], None], make_plan: Callable | None = None, search_deadline: float | None = None):
    """Run the study's trials on Ray Tune until every arm's budget is used (or budget.time_limit_s, or the
    `search_deadline` (time.monotonic) passed), then, with `make_plan`, the robustness stage's runs on the same
    workers; returns that stage's plan (or None)."""
    from ray import tune

    time_attr, max_t, grace = "progress", 1.0, grace_fraction(spec)
    trials: dict = {}
    progress = _progress.Progress(spec, study, out, trials)
    # the classes are looked up at call time (benchmarks/tuning.py's hand-over profile wraps them)
    search = _searcher.StudySearch(spec=spec, study=study, storage_url=storage_url, budgets=budgets,
                                   driver=driver, mirror=mirror, trials=trials, on_done=progress.done,
                                   max_failures=2 * sum(budgets.values()) + 2, make_plan=make_plan,
                                   time_limit_s=spec.time_limit_s, search_deadline=search_deadline)
    cpus, gpus = float(spec.resources["cpus_per_trial"]), float(spec.resources["gpus_per_trial"])
    variants = {}
    if spec.robustness:  # the long-context / noise variants the robustness stage may train
        for name in ("long_context", "noise"):
            if spec.robustness.get(name):
                variants[name] = portable_raw(variant_spec(spec, spec.robustness[name]))
    variants["main"] = portable_raw(spec)
    # every spec a worker may run, by variant (a search trial runs "main"), as plain JSON values
    ctx = {"spec_path": spec.path, "cpus": cpus, "gpus": gpus,
           "variants": json.loads(json.dumps(variants, default=str))}
    request = spec.trial_resources()
    resources = {"cpu": cpus, "gpu": gpus}
    if "memory" in request:
        resources["memory"] = request["memory"]
    resources.update({k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")})
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=arm_scheduler(spec, max_t, time_attr, grace),
            num_samples=-1,  # the searcher decides when the budget is spent
            max_concurrent_trials=int(spec.resources["max_concurrent"]),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{study.study_name}-{int(time.time())}",
            storage_path=str(workdir / "ray_results"),
            verbose=0,
            callbacks=[progress],
            stop=_progress.WaitLimit(progress),
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


def grace_fraction(spec: JobSpec) -> float:
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
