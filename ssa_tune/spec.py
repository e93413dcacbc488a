"""The job spec: one YAML file says what to tune, how, and where results go. Validated here, at the edge.

Every problem becomes one `UserError` naming the file and the dotted field. Nothing here imports Ray,
Optuna or MLflow: a spec is data, and `JobSpec.trial_config(params)` turns sampled values into the frozen
configs a trial trains with.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checks
from .config import GPTConfig, SSAConfig, TrainConfig, _yaml_load
from .errors import UserError

SECTIONS = ("name", "dataset", "model", "train", "ssa", "search", "objective", "budget", "scheduler",
            "resources", "sampler", "storage", "tracking", "baseline", "robustness")
# the two arms of a study that answers "does SSA help here?"; a study without a baseline has the SSA arm only
ARMS = ("baseline", "ssa")
RESOURCE_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "memory_gb": None, "custom": {}, "max_concurrent": 2,
                     "autoscale": False, "wait_for_resources_s": 600}
PARAM_TYPES = ("float", "int", "categorical", "bool")
SCHEDULERS = ("asha", "hyperband", "median", "none")
SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2")
DIRECTIONS = ("minimize", "maximize")
# the switch between SSA and the baseline; every ssa.* parameter is conditional on it
SSA_SWITCH = "ssa.enabled"


@dataclass(frozen=True)
class Param:
    name: str  # dotted: section.field[.sub]
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # (param or fixed key, allowed values): all must hold

    def values_to_check(self) -> list:
        if self.type in ("categorical", "bool"):
            return list(self.choices)
        return [self.low, self.high]

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class JobSpec:
    path: str
    name: str
    dataset: dict
    model: dict
    train: dict
    ssa: dict | None
    search: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    n_trials: int
    time_limit_s: float | None
    scheduler: dict
    resources: dict
    sampler: dict
    storage: str | None
    tracking: str | None
    baseline: bool
    robustness: dict | None
    baseline_share: float = 0.5
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def arms(self) -> tuple[str, ...]:
        """("baseline", "ssa") when the study compares SSA with plain attention, else the one arm it has."""
        if self.ssa is None:
            return ("baseline",)
        return ARMS if self.baseline else ("ssa",)

    def arm_budgets(self, n_trials: int | None = None) -> dict[str, int]:
        """Each arm's share of the budget (at least one trial each)."""
        n = self.n_trials if n_trials is None else n_trials
        if len(self.arms) == 1:
            return {self.arms[0]: n}
        base = min(max(1, round(n * self.baseline_share)), n - 1) if n > 1 else 1
        return {"baseline": base, "ssa": max(1, n - base)}

    def trial_resources(self) -> dict[str, float]:
        """What one trial asks Ray for (CPU, GPU, memory in bytes, custom resources)."""
        r = self.resources
        out = {"CPU": float(r["cpus_per_trial"]), "GPU": float(r["gpus_per_trial"])}
        if r.get("memory_gb"):
            out["memory"] = float(r["memory_gb"]) * 2**30
        out.update({k: float(v) for k, v in (r.get("custom") or {}).items()})
        return {k: v for k, v in out.items() if v > 0}

    @property
    def max_steps(self) -> int:
        return self.train_config({}).max_steps

    def searched(self, arm: str | None = None) -> list[Param]:
        """The parameters an arm samples (no arm: every one). The baseline arm samples no ssa.* knob."""
        return [p for p in self.search if not (arm == "baseline" and p.name.startswith("ssa."))]

    def local_paths(self) -> dict[str, str]:
        """The files and folders this spec reads, by dotted key (a text corpus, token files, a checkpoint)."""
        out = {}
        if self.dataset.get("path"):
            out["dataset.path"] = str(self.dataset["path"])
        if self.dataset.get("tokenizer"):
            out["dataset.tokenizer"] = str(self.dataset["tokenizer"])
        if self.model.get("path"):
            out["model.path"] = str(self.model["path"])
        return out

    def relative_raw(self, base: Path) -> dict:
        """The raw spec with the paths under `base` written relative to it: inside a Ray job the data shipped
        with the job sits in the job's working dir, whose absolute path differs from node to node."""
        raw = copy.deepcopy(self.raw)
        for key, value in self.local_paths().items():
            section, field_ = key.split(".")
            p = Path(value)
            if p.is_absolute() and p.is_relative_to(base):
                raw[section][field_] = str(p.relative_to(base))
        return raw

    def fixed_values(self) -> dict[str, Any]:
        """Dotted key -> value for every fixed setting, the configs' own defaults included (what `when`
        conditions refer to, and where an arm's first trial starts)."""
        out: dict[str, Any] = {}
        defaults = {"model": GPTConfig().to_dict(), "train": TrainConfig().to_dict(),
                    "ssa": SSAConfig().to_dict() if self.ssa is not None else {}}
        for section in ("dataset", "model", "train", "ssa"):
            values = {**defaults.get(section, {}), **(getattr(self, section) or {})}
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        out[SSA_SWITCH] = self.ssa is not None
        return out

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict(_apply(self.train, params, "train"))

    def trial_config(self, params: dict[str, Any]) -> tuple[dict, GPTConfig, TrainConfig, SSAConfig | None]:
        """The frozen configs of one trial from sampled `params` (dotted keys) over the fixed sections."""
        dataset = _apply(self.dataset, params, "dataset")
        model = GPTConfig.from_dict(_apply(self.model, params, "model"))
        train = TrainConfig.from_dict(_apply(self.train, params, "train"))
        enabled = params.get(SSA_SWITCH, self.ssa is not None)
        ssa = None
        if enabled:
            ssa = SSAConfig.from_dict(_apply(self.ssa or {}, params, "ssa"))
        return dataset, model, train, ssa

    def baseline_params(self) -> dict[str, Any]:
        """The baseline arm's first trial: SSA off, every other searched value at its fixed setting if it has one."""
        return {SSA_SWITCH: False, **self.default_params("baseline")}

    def default_params(self, arm: str) -> dict[str, Any]:
        """An arm's starting point: every searched value at the spec's fixed setting when it has one (for the
        SSA arm the `ssa:` section, the paper's configuration in the ready-made specs; for the baseline arm
        the plain model, so no ssa.* value)."""
        out: dict[str, Any] = {}
        fixed = self.fixed_values()
        for p in self.search:
            if arm == "baseline" and p.name.startswith("ssa.") or p.name not in fixed:
                continue
            if not p.active(fixed):
                continue
            v = fixed[p.name]
            if p.type in ("categorical", "bool") and v in p.choices:
                out[p.name] = v
            elif p.type in ("float", "int") and isinstance(v, (int, float)) and p.low <= v <= p.high:
                out[p.name] = v
        return out


def _apply(base: dict, params: dict[str, Any], section: str) -> dict:
    out = copy.deepcopy(base)
    prefix = section + "."
    for key, value in params.items():
        if not key.startswith(prefix) or key == SSA_SWITCH:
            continue
        parts = key[len(prefix):].split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | None = None, check_data: bool = True) -> JobSpec:
    """Read, validate and return the job spec at `path`; `overrides` are `dotted.key=value` strings."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError("file not found", file) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", file) from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"invalid YAML: {where}{problem}", file) from None
    if not isinstance(raw, dict):
        raise UserError("must be a YAML mapping of sections", file)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected dotted.key=value", file)
        try:  # YAML as in the file (1e-3 is a number, as the CLI's own help example writes it)
            parsed = _yaml_load(value)
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
    return validate(raw, file, check_data=check_data)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings; a scalar on the way (`layers: all` under `ssa.layers.count`) is
    replaced by a mapping, as the override asks for one."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _err(file: str, field: str, reason: str) -> UserError:
    return UserError(reason, file, field)


def _mapping(raw: dict, key: str, file: str, required: bool = False) -> dict:
    v = raw.get(key)
    if v is None:
        if required:
            raise _err(file, key, "required section")
        return {}
    if not isinstance(v, dict):
        raise _err(file, key, f"must be a mapping, got {type(v).__name__}")
    return v


def _field_error(file: str, section: str, e: Exception) -> UserError:
    """Configs raise `ValueError('field: reason')` (or TypeError); prefix the section."""
    msg = str(e)
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head:
        return _err(file, f"{section}.{head}", rest)
    return _err(file, section, msg)


def _check(file: str, fn, field: str, *args, **kwargs):
    """Run a `checks` validator and turn its "FIELD: reason" into the spec's one-line error."""
    try:
        return fn(field, *args, **kwargs)
    except ValueError as e:
        head, _, rest = str(e).partition(": ")
        raise _err(file, head, rest) from None


def _number(file, field, v, kind=float, minimum=None, allow_none=False):
    if kind is int:
        return _check(file, checks.integer, field, v, lo=minimum, allow_none=allow_none)
    return _check(file, checks.number, field, v, lo=minimum, allow_none=allow_none)


def validate(raw: dict, file: str, check_data: bool = True, base_dir: str | Path | None = None) -> JobSpec:
    """Check a raw spec and return the JobSpec. Relative paths inside it are relative to `base_dir` (default:
    the current directory, where the user stands) and are stored absolute: trials run elsewhere."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise _err(file, str(unknown[0]), f"unknown key (expected one of: {', '.join(SECTIONS)})")
    name = raw.get("name") or Path(file).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise _err(file, "name", f"must be letters, digits, '-', '_' or '.', got {name!r}")

    dataset = dict(_mapping(raw, "dataset", file, required=True))
    _check_dataset(dataset, file, check_data, Path(base_dir) if base_dir else Path.cwd())
    model = dict(_mapping(raw, "model", file))
    train = dict(_mapping(raw, "train", file))
    ssa_raw = raw.get("ssa", {})
    if ssa_raw is not None and not isinstance(ssa_raw, dict):
        raise _err(file, "ssa", f"must be a mapping or null, got {type(ssa_raw).__name__}")
    ssa = None if ssa_raw is None else dict(ssa_raw)
    try:
        GPTConfig.from_dict(model)
    except (ValueError, TypeError) as e:
        raise _field_error(file, "model", e) from None
    try:
        TrainConfig.from_dict(train)
    except (ValueError, TypeError) as e:
        raise _field_error(file, "train", e) from None
    if ssa is not None:
        try:
            SSAConfig.from_dict(ssa)
        except (ValueError, TypeError) as e:
            raise _field_error(file, "ssa", e) from None

    baseline = raw.get("baseline", True)
    if not isinstance(baseline, bool):
        raise _err(file, "baseline", f"must be true or false, got {baseline!r}")
    search = _check_search(_mapping(raw, "search", file), file)
    objectives = _check_objective(raw.get("objective"), file)

    budget = _mapping(raw, "budget", file)
    _unknown(budget, {"n_trials", "time_limit_s", "baseline_share"}, file, "budget")
    n_trials = _number(file, "budget.n_trials", budget.get("n_trials", 12), int, 1)
    time_limit = _number(file, "budget.time_limit_s", budget.get("time_limit_s"), float, 1, allow_none=True)
    share = _check(file, checks.number, "budget.baseline_share", budget.get("baseline_share", 0.5), lo=0.0, hi=1.0,
                   lo_open=True, hi_open=True)
    two_arms = ssa is not None and baseline
    if two_arms and n_trials < 2:
        raise _err(file, "budget.n_trials", "must be >= 2: the baseline and the SSA arm get one trial each at least")

    scheduler = {"kind": "asha", "grace_steps": None, "reduction_factor": 3, **_mapping(raw, "scheduler", file)}
    _unknown(scheduler, {"kind", "grace_steps", "reduction_factor"}, file, "scheduler")
    if scheduler["kind"] not in SCHEDULERS:
        raise _err(file, "scheduler.kind", f"must be one of {', '.join(SCHEDULERS)}, got {scheduler['kind']!r}")
    _number(file, "scheduler.grace_steps", scheduler["grace_steps"], int, 1, allow_none=True)
    _number(file, "scheduler.reduction_factor", scheduler["reduction_factor"], float, 1.01)

    resources = {**RESOURCE_DEFAULTS, **_mapping(raw, "resources", file)}
    _unknown(resources, set(RESOURCE_DEFAULTS), file, "resources")
    _number(file, "resources.cpus_per_trial", resources["cpus_per_trial"], float, 0.01)
    _number(file, "resources.gpus_per_trial", resources["gpus_per_trial"], float, 0)
    _check(file, checks.number, "resources.memory_gb", resources["memory_gb"], lo=0.0, lo_open=True, allow_none=True)
    _number(file, "resources.max_concurrent", resources["max_concurrent"], int, 1)
    _check(file, checks.boolean, "resources.autoscale", resources["autoscale"])
    _number(file, "resources.wait_for_resources_s", resources["wait_for_resources_s"], float, 1)
    custom = _check(file, checks.mapping, "resources.custom", resources["custom"])
    for k, v in custom.items():
        if not isinstance(k, str) or k in ("CPU", "GPU", "memory", "object_store_memory"):
            raise _err(file, f"resources.custom.{k}", "must name a custom Ray resource (CPU, GPU and memory have "
                       "their own keys)")
        _number(file, f"resources.custom.{k}", v, float, 0)
    resources["custom"] = dict(custom)

    sampler = {"kind": "tpe", "seed": 0, **_mapping(raw, "sampler", file)}
    _unknown(sampler, {"kind", "seed", "n_startup_trials"}, file, "sampler")
    if sampler["kind"] not in SAMPLERS:
        raise _err(file, "sampler.kind", f"must be one of {', '.join(SAMPLERS)}, got {sampler['kind']!r}")
    _number(file, "sampler.seed", sampler["seed"], int, 0, allow_none=True)
    if len(objectives) > 1:
        if sampler["kind"] not in ("nsga2", "random", "tpe", "gp"):
            raise _err(file, "sampler.kind", f"{sampler['kind']} does not support several objectives")
        if scheduler["kind"] != "none":
            raise _err(file, "scheduler.kind", "early stopping needs a single objective; use kind: none")

    for key in ("storage", "tracking"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise _err(file, key, f"must be a URL string or null, got {v!r}")
    robustness = _check_robustness(raw.get("robustness"), file)

    raw = {**raw, "dataset": dataset}  # with the dataset path made absolute: workers run elsewhere
    spec = JobSpec(path=file, name=name, dataset=dataset, model=model, train=train, ssa=ssa,
                   search=search, objectives=objectives, n_trials=n_trials, time_limit_s=time_limit,
                   scheduler=scheduler, resources=resources, sampler=sampler, storage=raw.get("storage"),
                   tracking=raw.get("tracking"), baseline=baseline, robustness=robustness, baseline_share=share,
                   raw=raw)
    _check_search_values(spec)
    if spec.ssa is None and any(p.name.startswith("ssa.") for p in search):
        raise _err(file, "ssa", "null (SSA off) but the search has ssa.* parameters")
    return spec


def _unknown(d: dict, known: set, file: str, section: str) -> None:
    for k in d:
        if k not in known:
            raise _err(file, f"{section}.{k}", f"unknown key (expected one of: {', '.join(sorted(known))})")


def _check_dataset(dataset: dict, file: str, check_data: bool, base_dir: Path) -> None:
    from .data import DATASET_KINDS, KIND_PARAMS, DataError, check_dataset

    kind = dataset.get("kind")
    if kind not in DATASET_KINDS:
        raise _err(file, "dataset.kind", f"must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    _unknown({k: v for k, v in dataset.items() if k != "kind"}, set(KIND_PARAMS[kind]), file, "dataset")
    if "path" in dataset:
        p = Path(str(dataset["path"])).expanduser()
        if not p.is_absolute():  # relative to where the user stands (or the job's working dir)
            p = base_dir / p
        if not p.exists():
            raise _err(file, "dataset.path", f"{dataset['path']}: no such file or directory")
        dataset["path"] = str(p)
    if check_data:
        try:
            check_dataset(dataset)
        except DataError as e:  # its message is "dataset.FIELD: reason"
            head, _, rest = str(e).partition(": ")
            raise _err(file, head, rest) from None
        except (ValueError, TypeError) as e:
            raise _err(file, "dataset", str(e)) from None


def _check_search(search: dict, file: str) -> tuple[Param, ...]:
    params = []
    names = set()
    for name, p in search.items():
        f = f"search.{name}"
        if not isinstance(name, str) or name.split(".")[0] not in ("dataset", "model", "train", "ssa"):
            raise _err(file, f, "parameter names are dotted keys into dataset, model, train or ssa")
        if name == SSA_SWITCH:
            raise _err(file, f, "SSA on/off is not searched: `baseline: true` tunes a baseline arm and an SSA arm "
                       "on their own budgets (budget.baseline_share)")
        if not isinstance(p, dict):
            raise _err(file, f, "must be a mapping like {type: float, low: ..., high: ...}")
        _unknown(p, {"type", "low", "high", "log", "step", "choices", "when"}, file, f)
        t = p.get("type")
        if t not in PARAM_TYPES:
            raise _err(file, f"{f}.type", f"must be one of {', '.join(PARAM_TYPES)}, got {t!r}")
        log = p.get("log", False)
        if not isinstance(log, bool):
            raise _err(file, f"{f}.log", f"must be true or false, got {log!r}")
        when = _check_when(p.get("when"), names, file, f"{f}.when")
        if t in ("float", "int"):
            kind = int if t == "int" else float
            for b in ("low", "high"):
                if b not in p:
                    raise _err(file, f"{f}.{b}", "required for a numeric range")
            low = _number(file, f"{f}.low", p["low"], kind)
            high = _number(file, f"{f}.high", p["high"], kind)
            if low > high:
                raise _err(file, f, f"inverted range: low {low} > high {high}")
            if low == high:
                raise _err(file, f, f"empty range: low == high == {low}")
            if log and low <= 0:
                raise _err(file, f"{f}.low", "must be > 0 for a log range")
            step = _number(file, f"{f}.step", p.get("step"), kind, allow_none=True)
            if step is not None and (step <= 0 or log):
                raise _err(file, f"{f}.step", "must be > 0 and cannot be combined with log")
            if "choices" in p:
                raise _err(file, f"{f}.choices", f"not used by type {t}")
            params.append(Param(name, t, low, high, log, step, (), when))
        else:
            if any(k in p for k in ("low", "high", "step")) or log:
                raise _err(file, f, f"low/high/step/log are not used by type {t}")
            choices = p.get("choices", [True, False] if t == "bool" else None)
            if not isinstance(choices, list) or not choices:
                raise _err(file, f"{f}.choices", "must be a non-empty list")
            if len(set(map(repr, choices))) != len(choices):
                raise _err(file, f"{f}.choices", "has duplicates")
            if t == "bool" and not all(isinstance(c, bool) for c in choices):
                raise _err(file, f"{f}.choices", "must hold true/false")
            if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
                raise _err(file, f"{f}.choices", "must hold scalars (strings, numbers, booleans, null)")
            params.append(Param(name, t, choices=tuple(choices), when=when))
        names.add(name)
    return tuple(params)


def _check_when(when, earlier: set, file: str, f: str) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise _err(file, f, "must be a mapping {param: value or [values]}")
    out = []
    for k, v in when.items():
        if k not in earlier and not str(k).startswith(("dataset.", "model.", "train.", "ssa.")):
            raise _err(file, f"{f}.{k}", "must name an earlier search parameter or a fixed dotted key")
        out.append((k, tuple(v) if isinstance(v, list) else (v,)))
    return tuple(out)


def _check_objective(obj, file: str) -> tuple[Objective, ...]:
    if obj is None:
        return (Objective("val_loss", "minimize"),)
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for i, o in enumerate(items):
        f = "objective" if not isinstance(obj, list) else f"objective.{i}"
        if not isinstance(o, dict):
            raise _err(file, f, "must be {metric: NAME, direction: minimize|maximize}")
        _unknown(o, {"metric", "direction"}, file, f)
        metric = o.get("metric")
        if not isinstance(metric, str) or not metric:
            raise _err(file, f"{f}.metric", "required metric name (e.g. val_loss)")
        direction = o.get("direction", "maximize" if metric.endswith("acc") else "minimize")
        if direction not in DIRECTIONS:
            raise _err(file, f"{f}.direction", f"must be minimize or maximize, got {direction!r}")
        out.append(Objective(metric, direction))
    if len({o.metric for o in out}) != len(out):
        raise _err(file, "objective", "the same metric appears twice")
    return tuple(out)


def _check_robustness(r, file: str) -> dict | None:
    if r is None:
        return None
    if not isinstance(r, dict):
        raise _err(file, "robustness", "must be a mapping")
    out = {"top_k": 3, "seeds": 3, "penalty": 1.0, "long_context": None, "noise": None, "constraint": False, **r}
    _unknown(out, {"top_k", "seeds", "penalty", "long_context", "noise", "constraint"}, file, "robustness")
    _number(file, "robustness.top_k", out["top_k"], int, 1)
    _number(file, "robustness.seeds", out["seeds"], int, 2)
    _number(file, "robustness.penalty", out["penalty"], float, 0)
    if not isinstance(out["constraint"], bool):
        raise _err(file, "robustness.constraint", "must be true or false")
    for k in ("long_context", "noise"):
        if out[k] is not None and not isinstance(out[k], dict):
            raise _err(file, f"robustness.{k}", "must be a mapping of dataset settings or null")
    return out


def _check_search_values(spec: JobSpec) -> None:
    """Every value a parameter can take must build valid configs: catch a bad range before any trial runs.
    Each value is checked with the other parameters at their first value (low end or first choice)."""
    first = {p.name: p.values_to_check()[0] for p in spec.search}
    for p in spec.search:
        for v in p.values_to_check():
            params = {**first, p.name: v}
            if any(k.startswith("ssa.") for k in params):
                params[SSA_SWITCH] = True
            if spec.ssa is None and SSA_SWITCH not in first:
                params = {k: x for k, x in params.items() if not k.startswith("ssa.")}
            try:
                spec.trial_config(params)
            except (ValueError, TypeError) as e:
                raise _err(spec.path, f"search.{p.name}", f"value {v!r} is invalid: {e}") from None
