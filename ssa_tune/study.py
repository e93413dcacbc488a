"""The Optuna side: storage, samplers, the two arms, the define-by-run space, drivers, and reading a study back.

Optuna's RDB storage is the single source of truth of a study: Ray Tune executes its trials, MLflow
mirrors them, but counts, states, params, arms and the best trial are always read from here.

Two arms. A study that answers "does SSA help here?" tunes a baseline arm (plain attention) and an SSA arm on
their own shares of the budget. Each arm has its own sampler, and each sampler sees only its arm's trials
(`ArmSampler` hands it a filtered view of the study, as Optuna's Hyperband pruner does per bracket), so one
arm's values never steer the other's sampling. A trial's arm is the trial user attribute `ssa_tune.arm`.

Several drivers may run one study (two `ssa-tune run` on one PostgreSQL study, or a `resume` on another
host): each registers itself with a heartbeat, owns the trials it asks for, and only trials whose driver is
gone are ever marked FAIL. Asking for a trial and checking the budget happen under one lock per study
(`study_lock`: an advisory lock on PostgreSQL, a file lock beside a SQLite file), so the budget holds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import time
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.trial import TrialState

from .compat import CACHED_STORAGE_BACKEND_CALLS, forget_cached_trials, storage_of, study_id_of, trial_id_of
from .errors import UserError
from .redact import redact  # noqa: F401  (st.redact, used across the service)
from .spec import ARMS, SSA_SWITCH, JobSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
# TPE's `group` (conditional ssa.* parameters) is marked experimental; the warning tells the user nothing
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# study user attributes
ATTR_SPEC = "ssa_tune.spec"  # the validated raw spec (JSON), so resume/export need no file
ATTR_SPEC_PATH = "ssa_tune.spec_path"
ATTR_N_TRIALS = "ssa_tune.n_trials"
ATTR_TRACKING = "ssa_tune.tracking_uri"
ATTR_PARENT_RUN = "ssa_tune.parent_run_id"
ATTR_EXPERIMENT = "ssa_tune.experiment_id"
ATTR_DRIVER_PREFIX = "ssa_tune.driver."  # + driver id -> {"host", "pid", "started", "beat", "stopped"}
ATTR_WAITING = "ssa_tune.waiting_for_resources"  # {"since", "pending", "asks"} while trials wait for a node
ATTR_MLFLOW_PENDING = "ssa_tune.mlflow_pending"  # + "." + run key -> MLflow writes not yet delivered
ATTR_MLFLOW_RUN = "ssa_tune.mlflow_run."  # + run key -> its MLflow run id, where a trial attribute cannot hold it
ATTR_ROBUSTNESS = "ssa_tune.robustness"  # the robustness stage's record: summary, winner, verdict (robustness.py)
# trial user attributes
T_ARM = "ssa_tune.arm"
T_DRIVER = "ssa_tune.driver"
T_RUN = "ssa_tune.mlflow_run_id"
T_REASON = "ssa_tune.fail_reason"
T_RETRY_OF = "ssa_tune.retry_of"
T_PRUNED_AT = "ssa_tune.pruned_at_step"
T_FINAL = "ssa_tune.final_metrics"  # {metric: its last value} of a finished trial
T_PRECISION = "ssa_tune.precision"  # the trial's training precision (fp32, bf16 or fp16), as its worker chose
T_NODE = "ssa_tune.node"  # {"node_id", "ip", "hostname", "pid"}: the Ray node and worker process of the trial

HEARTBEAT_S = 10.0  # a driver records that it is alive this often
GRACE_S = 60.0  # a driver on another host silent this long is gone


# ------------------------------------------------------------------------------------------------ storage


def default_storage(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'optuna.db').resolve()}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def _transient(e: BaseException) -> bool:
    """A database error worth retrying: the server restarted or dropped the connection, or SQLite was busy."""
    from sqlalchemy import exc

    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, (exc.OperationalError, exc.InterfaceError)):
            return True
        if isinstance(err, exc.DBAPIError) and err.connection_invalidated:
            return True
    return False


RETRY_S = 120.0  # how long a storage call keeps retrying through a database restart


def _retrying(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        deadline, delay = time.monotonic() + RETRY_S, 0.25
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - only transient ones are retried
                if not _transient(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose every call is retried while the database is unreachable (a PostgreSQL restart, a
    dropped connection): the pool's pre-ping then reconnects. A write whose commit was cut off may in
    principle be repeated; Optuna's own writes are row updates that are safe to repeat, except creating a
    trial, which only happens under the study lock."""


# the storage interface Optuna's Study and trials call (optuna.storages.BaseStorage, public), each method as
# RDBStorage implements it, and the private ones Optuna's trial cache calls on it instead (a study's trials are
# read through `_get_trials`); RDBStorage's own extras (schema upgrades, heartbeats) are left as they are
for _name in [n for n, f in vars(optuna.storages.BaseStorage).items() if callable(f) and not n.startswith("_")] \
        + list(CACHED_STORAGE_BACKEND_CALLS):
    _fn = getattr(optuna.storages.RDBStorage, _name)
    setattr(RetryingRDBStorage, _name, _retrying(_fn))


def open_storage(url: str, create: bool = True) -> RetryingRDBStorage:
    """The study storage; SQLite gets WAL and a generous busy timeout so concurrent trials never lose a
    write. A file that is not a study database, or one of another Optuna schema, is one clear UserError."""
    path = _sqlite_path(url)
    kwargs: dict[str, Any] = {}
    if path is not None:
        if not create and not path.exists():
            raise UserError(f"no study database at {path}", field="storage")
        if path.exists():  # a file that is not a study database: one line, before a lock file is made beside it
            _sqlite_check(path, wal=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        # two processes opening a new database at once would both create its tables (or switch a new SQLite
        # file to WAL while the other writes them); an existing SQLite file says nothing (its first opener makes
        # the file before the tables), so every opener waits its turn
        with study_lock(url, "__schema__"):
            if path is not None:
                _sqlite_check(path, wal=True)
            return RetryingRDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=False)
    except UserError:
        raise
    except Exception as e:  # OperationalError, ArgumentError, RuntimeError (schema), ModuleNotFoundError (driver)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "compatible" in first or "schema" in first.lower():
            raise UserError(f"{redact(url)}: written by another Optuna version: {first}", field="storage") from None
        raise UserError(f"cannot open {redact(url)}: {first}", field="storage") from None


def _sqlite_check(path: Path, wal: bool) -> None:
    """Read the file's schema (a UserError when it is no SQLite database) and, with `wal`, switch it to WAL."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            if wal:
                con.execute("PRAGMA journal_mode=WAL")
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: not a readable study database ({e})", field="storage") from None


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


@functools.lru_cache(maxsize=8)
def _lock_engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=2)


@contextlib.contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """Serialise "count the budget, then ask for a trial" (and a study's set-up) across drivers."""
    key = zlib.crc32(f"ssa-tune:{study_name}".encode())
    path = _sqlite_path(url)
    if path is not None:
        import fcntl

        lock = path.with_name(f"{path.name}.{key:08x}.lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if not url.startswith(("postgresql", "mysql")):
        yield
        return
    import sqlalchemy

    @_retrying
    def acquire():
        conn = _lock_engine(url).connect()
        try:
            if url.startswith("postgresql"):
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            else:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 600)"), {"k": f"ssa-tune-{key}"})
        except Exception:
            conn.close()
            raise
        return conn

    conn = acquire()
    try:
        yield
    finally:
        try:  # closing the connection releases a session lock even if the unlock fails
            if url.startswith("postgresql"):
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"ssa-tune-{key}"})
        except Exception:  # noqa: BLE001
            conn.invalidate()
        finally:
            conn.close()


# ----------------------------------------------------------------------------------------------- samplers


def make_sampler(spec: JobSpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. `offset` shifts the seed (each arm, and each resumed round, gets its own)."""
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
        kw = {} if startup is None else {"n_startup_trials": startup}
        return optuna.samplers.GPSampler(seed=seed, **kw)
    if kind == "cmaes":
        kw = {} if startup is None else {"n_startup_trials": startup}
        return optuna.samplers.CmaEsSampler(seed=seed, **kw)
    return optuna.samplers.NSGAIISampler(seed=seed)


def arm_of(trial) -> str:
    """The arm of a trial: its recorded arm, else what its SSA switch says."""
    arm = trial.user_attrs.get(T_ARM)
    if arm in ARMS:
        return arm
    enabled = trial.params.get(SSA_SWITCH, trial.system_attrs.get("fixed_params", {}).get(SSA_SWITCH))
    return "baseline" if enabled is False else "ssa"


class _ArmView:
    """The study as one arm's sampler sees it: only that arm's trials (cf. Optuna's `_BracketStudy`)."""

    def __init__(self, study: optuna.Study, arm: str):
        self._study, self._arm = study, arm

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return [t for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
                if arm_of(t) == self._arm]

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self):
        return self.get_trials()

    def __getattr__(self, name: str):
        return getattr(self._study, name)


class ArmSampler(optuna.samplers.BaseSampler):
    """One sampler per arm; each is handed a view of the study holding only its own arm's trials."""

    def __init__(self, samplers: dict[str, optuna.samplers.BaseSampler]):
        self.samplers = samplers

    def _pick(self, study, trial):
        arm = arm_of(trial)
        return self.samplers.get(arm) or next(iter(self.samplers.values())), _ArmView(study, arm)

    def infer_relative_search_space(self, study, trial):
        sampler, view = self._pick(study, trial)
        return sampler.infer_relative_search_space(view, trial)

    def sample_relative(self, study, trial, search_space):
        sampler, view = self._pick(study, trial)
        return sampler.sample_relative(view, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        sampler, view = self._pick(study, trial)
        return sampler.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        sampler, view = self._pick(study, trial)
        sampler.before_trial(view, trial)

    def after_trial(self, study, trial, state, values):
        sampler, view = self._pick(study, trial)
        sampler.after_trial(view, trial, state, values)

    def reseed_rng(self) -> None:
        for s in self.samplers.values():
            s.reseed_rng()


def study_sampler(spec: JobSpec, offset: int = 0) -> ArmSampler:
    return ArmSampler({arm: make_sampler(spec, offset + 1000 * i) for i, arm in enumerate(spec.arms)})


# ------------------------------------------------------------------------------------------- search space


def suggest_all(trial, spec: JobSpec) -> dict[str, Any]:
    """Define-by-run: the trial's SSA switch (fixed by its arm in a two-arm study), then every active parameter."""
    values = spec.fixed_values()
    two_arms = len(spec.arms) > 1
    enabled = trial.suggest_categorical(SSA_SWITCH, [True, False]) if two_arms else spec.arms[0] == "ssa"
    values[SSA_SWITCH] = enabled
    out: dict[str, Any] = {SSA_SWITCH: enabled} if two_arms else {}
    for p in spec.searched("ssa" if enabled else "baseline"):
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


def ask_arm(study: optuna.Study, spec: JobSpec, arm: str, driver: str) -> optuna.trial.Trial:
    """A RUNNING trial of `arm` owned by `driver`: a queued one of that arm (a default or a retry) when there
    is one, else a new one. Call under `study_lock`."""
    from optuna.trial import create_trial

    storage = storage_of(study)
    trial_id = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if arm_of(t) != arm:
            continue
        try:
            if storage.set_trial_state_values(trial_id_of(t), state=TrialState.RUNNING):
                trial_id = trial_id_of(t)
                break
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    if trial_id is None:
        fixed = {SSA_SWITCH: arm == "ssa"} if len(spec.arms) > 1 else {}
        template = create_trial(state=TrialState.RUNNING, params={}, distributions={},
                                system_attrs={"fixed_params": fixed}, user_attrs={T_ARM: arm})
        trial_id = storage.create_new_trial(study_id_of(study), template_trial=template)
    storage.set_trial_user_attr(trial_id, T_ARM, arm)
    storage.set_trial_user_attr(trial_id, T_DRIVER, driver)
    forget_cached_trials(study)
    return optuna.trial.Trial(study, trial_id)


FINISHED = "finished"


def next_arm(study: optuna.Study, budgets: dict[str, int]) -> str | None:
    """Which arm the next trial belongs to: the arm furthest behind its share among those with a free slot
    (COMPLETE, PRUNED and RUNNING trials take slots, whoever runs them); None when the free slots are all
    running; FINISHED when every arm has used its budget. Call under `study_lock`."""
    used = dict.fromkeys(budgets, 0)
    taken = dict.fromkeys(budgets, 0)
    for t in study.get_trials(deepcopy=False):
        arm = arm_of(t)
        if arm not in used:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            used[arm] += 1
            taken[arm] += 1
        elif t.state == TrialState.RUNNING:
            taken[arm] += 1
    if all(used[a] >= budgets[a] for a in budgets):
        return FINISHED
    free = [a for a in budgets if taken[a] < budgets[a]]
    if not free:
        return None
    return min(free, key=lambda a: (taken[a] / budgets[a], ARMS.index(a)))


def enqueue(study: optuna.Study, spec: JobSpec, arm: str, params: dict[str, Any], user_attrs: dict | None = None) -> None:
    """Queue a trial with fixed params for `arm` (its default configuration, or a retry)."""
    fixed = {**params, SSA_SWITCH: arm == "ssa"} if len(spec.arms) > 1 else dict(params)
    study.enqueue_trial(fixed, user_attrs={**(user_attrs or {}), T_ARM: arm}, skip_if_exists=False)


def directions(spec: JobSpec) -> list[str]:
    return [o.direction for o in spec.objectives]


def create_or_load(spec: JobSpec, storage: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions(spec),
                                sampler=study_sampler(spec), load_if_exists=True)
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


# --------------------------------------------------------------------------------------------- reading


_STATE_KEYS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def counts(study: optuna.Study, arm: str | None = None, trials=None) -> dict[str, int]:
    c = dict.fromkeys(_STATE_KEYS.values(), 0)
    for t in trials if trials is not None else study.get_trials(deepcopy=False):
        if arm is None or arm_of(t) == arm:
            c[_STATE_KEYS[t.state]] += 1
    return c


def budget_used(study: optuna.Study, arm: str | None = None) -> int:
    """What counts toward n_trials: COMPLETE and PRUNED, as Optuna's MaxTrialsCallback counts."""
    c = counts(study, arm)
    return c["complete"] + c["pruned"]


def best_trial(study: optuna.Study, arm: str | None = None):
    """The best COMPLETE trial (of one arm when given) by the first objective. (A multi-objective study has a
    front rather than one best: this is the front member best on the first objective.)"""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and (arm is None or arm_of(t) == arm)]
    if not done:
        return None
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(done, key=lambda t: (sign * t.values[0], t.number))


def rows(study: optuna.Study, objectives: list[str], arm: str | None = None) -> list[dict]:
    """The COMPLETE trials as rows for `selection`: their final metrics and objective values by name."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if arm is not None and arm_of(t) != arm or not t.values:
            continue
        metrics = dict(t.user_attrs.get(T_FINAL) or {})
        for name, v in zip(objectives, t.values):
            metrics[name] = v
        out.append({"id": f"trial-{t.number}", "number": t.number, "arm": arm_of(t), "metrics": metrics,
                    "params": dict(t.params)})
    return out


def run_id(study: optuna.Study, trial) -> str | None:
    """The MLflow run of a trial (recorded on the trial, or on the study when it came after the trial ended)."""
    return trial.user_attrs.get(T_RUN) or study.user_attrs.get(f"{ATTR_MLFLOW_RUN}trial-{trial.number}")


# ---------------------------------------------------------------------------------------------- drivers


def new_driver_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def beat(study: optuna.Study, driver: str, stopped: bool = False) -> None:
    """Record that `driver` is alive (or, with `stopped`, that it ended cleanly)."""
    study.set_user_attr(ATTR_DRIVER_PREFIX + driver, {
        "host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()),
        "beat": time.time(), "stopped": stopped})


def process_start(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it (Linux: /proc/PID/stat field 22, clock ticks since
    boot, plus the boot's id): with the PID, it names one process; a PID reused later has another start.
    None where it cannot be read."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return f"{boot}:{fields[19]}"


def _alive(record: dict | None, now: float) -> bool:
    """A driver is alive while its heartbeat is fresh (younger than GRACE_S), on every host. On this host a
    driver whose process is gone is dead at once: no process with its PID, or one that started at another
    time (the PID was reused, e.g. by a restarted container with the same hostname)."""
    if not record or record.get("stopped"):
        return False
    if record.get("host") == socket.gethostname():
        try:
            pid = int(record["pid"])
        except (KeyError, ValueError, TypeError):
            return False
        started = process_start(pid)
        if started is None and not _pid_exists(pid):
            return False
        if record.get("started") is not None and started is not None and started != record["started"]:
            return False
    try:
        return now - float(record.get("beat", 0)) < GRACE_S
    except (TypeError, ValueError):
        return False


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, another user's
        return True
    return True


def live_drivers(study: optuna.Study) -> dict[str, dict]:
    now = time.time()
    attrs = study.user_attrs
    return {k[len(ATTR_DRIVER_PREFIX):]: v for k, v in attrs.items()
            if k.startswith(ATTR_DRIVER_PREFIX) and _alive(v, now)}


def orphans(study: optuna.Study, me: str | None = None) -> list:
    """RUNNING trials whose driver is gone: dead on this host, silent for GRACE_S on another, or stopped.
    A RUNNING trial that names no driver is an orphan only when no other driver is alive."""
    live = live_drivers(study)
    others = set(live) - {me}
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(T_DRIVER)
        if owner is None and not others or owner is not None and owner not in live:
            out.append(t)
    return out


def fail_trials(study: optuna.Study, trials: list, reason: str) -> list:
    """Mark trials FAIL with the reason (those another driver finished meanwhile are skipped)."""
    storage, failed = storage_of(study), []
    for t in trials:
        try:
            storage.set_trial_user_attr(trial_id_of(t), T_REASON, reason)
            storage.set_trial_state_values(trial_id_of(t), TrialState.FAIL)
            failed.append(t)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    forget_cached_trials(study)
    return failed


def enqueue_retries(study: optuna.Study, failed: list) -> int:
    """Re-run once the parameters of trials lost to the infrastructure (driver or worker killed), as Optuna's
    RetryFailedTrialCallback does. A retry that is lost again is not retried a second time."""
    n = 0
    for t in failed:
        if t.user_attrs.get(T_RETRY_OF) is not None:
            continue
        params = {k: v for k, v in t.params.items()}
        study.enqueue_trial(params, user_attrs={T_RETRY_OF: t.number, T_ARM: arm_of(t)}, skip_if_exists=False)
        n += 1
    return n
