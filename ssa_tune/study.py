"""The Optuna side: storage, samplers, the define-by-run search space, and reading a study back.

Optuna's RDB storage is the single source of truth of a study: Ray Tune executes its trials, MLflow
mirrors them, but counts, states, params and the best trial are always read from here.
"""

from __future__ import annotations

import json
import os
import warnings
import socket
import sqlite3
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .errors import UserError
from .spec import SSA_SWITCH, JobSpec, Param

optuna.logging.set_verbosity(optuna.logging.WARNING)
# TPE's `group` (conditional ssa.* parameters) is marked experimental; the warning tells the user nothing
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# study user attributes
ATTR_SPEC = "ssa_tune.spec"  # the validated raw spec (JSON), so resume/export need no file
ATTR_SPEC_PATH = "ssa_tune.spec_path"
ATTR_DRIVER = "ssa_tune.driver"  # {"host", "pid"} of the driver running the study
ATTR_TRACKING = "ssa_tune.tracking_uri"
ATTR_PARENT_RUN = "ssa_tune.parent_run_id"
ATTR_EXPERIMENT = "ssa_tune.experiment_id"
# trial user attributes
T_RUN = "ssa_tune.mlflow_run_id"
T_REASON = "ssa_tune.fail_reason"
T_RETRY_OF = "ssa_tune.retry_of"
T_PRUNED_AT = "ssa_tune.pruned_at_step"


def default_storage(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'optuna.db').resolve()}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDBStorage; SQLite gets WAL and a generous busy timeout so concurrent trials never lose a write."""
    path = _sqlite_path(url)
    kwargs: dict[str, Any] = {}
    if path is not None:
        if not create and not path.exists():
            raise UserError(f"no study database at {path}", field="storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as con:
            con.execute("PRAGMA journal_mode=WAL")
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=False)
    except Exception as e:  # sqlalchemy.exc.OperationalError, ArgumentError, ModuleNotFoundError for a driver
        raise UserError(f"cannot open {redact(url)}: {str(e).splitlines()[0]}", field="storage") from None


def redact(url: str) -> str:
    """A URL without its password, for anything printed or logged."""
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        return u.render_as_string(hide_password=True) if u.password else url
    except Exception:
        return url


def check_storage(url: str) -> None:
    """Connect once, so an unreachable server is reported before anything is written."""
    if _sqlite_path(url) is not None:
        return
    try:
        import sqlalchemy

        eng = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})
        with eng.connect():
            pass
        eng.dispose()
    except Exception as e:
        raise UserError(f"cannot connect to {redact(url)}: {str(e).strip().splitlines()[0]}", field="storage") from None


def make_sampler(spec: JobSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. `offset` (the trials already in the study) shifts the seed, so a resumed or
    further round does not replay the random sequence of the first one."""
    kind, seed = spec.sampler["kind"], spec.sampler.get("seed")
    if seed is not None:
        seed += offset
    startup = spec.sampler.get("n_startup_trials")
    if kind == "tpe":
        kw = {} if startup is None else {"n_startup_trials": startup}
        # multivariate + group model the conditional ssa.* parameters jointly; constant_liar keeps
        # concurrent workers from sampling the same point
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True, **kw)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def searched_params(spec: JobSpec) -> list[Param]:
    """The spec's parameters plus the SSA-vs-baseline switch when the study must answer "does SSA help?"."""
    params = list(spec.search)
    if spec.ssa is not None and spec.baseline and not any(p.name == SSA_SWITCH for p in params):
        params.insert(0, Param(SSA_SWITCH, "categorical", choices=(True, False)))
    return params


def suggest_all(trial, spec: JobSpec) -> dict[str, Any]:
    """Define-by-run: suggest every active parameter (conditionals skipped) and return them."""
    values = spec.fixed_values()
    out: dict[str, Any] = {}
    for p in searched_params(spec):
        if p.name.startswith("ssa.") and p.name != SSA_SWITCH and not values.get(SSA_SWITCH):
            continue
        if not p.active(values):
            continue
        if p.type == "float":
            v = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            v = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=p.step or 1)
        else:
            v = trial.suggest_categorical(p.name, list(p.choices))
        values[p.name] = out[p.name] = v
    return out


def directions(spec: JobSpec) -> list[str]:
    return [o.direction for o in spec.objectives]


def create_or_load(spec: JobSpec, storage: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions(spec),
                                sampler=make_sampler(spec), load_if_exists=True)
    if study.directions != [optuna.study.StudyDirection.MINIMIZE if d == "minimize" else
                            optuna.study.StudyDirection.MAXIMIZE for d in directions(spec)]:
        raise UserError(f"study {study_name!r} exists with other objective directions", spec.path, "objective")
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        hint = f" (studies: {', '.join(names)})" if names else " (no studies in this storage)"
        raise UserError(f"no study named {name!r}{hint}", field="study") from None


def study_spec(study: optuna.Study) -> dict:
    raw = study.user_attrs.get(ATTR_SPEC)
    if raw is None:
        raise UserError(f"study {study.study_name!r} was not created by ssa-tune (no spec recorded)", field="study")
    return json.loads(raw)


def counts(study: optuna.Study) -> dict[str, int]:
    c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
           TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    for t in study.get_trials(deepcopy=False):
        c[key[t.state]] += 1
    return c


def budget_used(study: optuna.Study) -> int:
    """What counts toward n_trials: COMPLETE and PRUNED, as Optuna's MaxTrialsCallback counts."""
    c = counts(study)
    return c["complete"] + c["pruned"]


def best_trial(study: optuna.Study):
    """The best COMPLETE trial (single objective), or the first of the Pareto front; None when none."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return study.best_trials[0] if study.best_trials else None


def driver_alive(study: optuna.Study) -> dict | None:
    """The recorded driver if it still runs on this host."""
    d = study.user_attrs.get(ATTR_DRIVER)
    if not d or d.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(d["pid"]), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return None
    except PermissionError:
        return d
    if int(d["pid"]) == os.getpid():
        return None
    return d


def fail_orphans(study: optuna.Study, reason: str) -> list:
    """Mark RUNNING trials (their driver is gone) FAIL, recording why; returns them."""
    storage = study._storage
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        storage.set_trial_user_attr(t._trial_id, T_REASON, reason)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return orphans


def enqueue_retries(study: optuna.Study, killed: list) -> int:
    """Re-run once the parameters of trials killed mid-run, as Optuna's RetryFailedTrialCallback does.
    A retry that is killed again is not retried a second time (bounded retries)."""
    n = 0
    for t in killed:
        if t.user_attrs.get(T_RETRY_OF) is not None:
            continue
        study.enqueue_trial(dict(t.params), user_attrs={T_RETRY_OF: t.number}, skip_if_exists=False)
        n += 1
    return n
