"""The job spec: one YAML file says what to tune, how, and where results go. Validated here, at the edge.

Every problem becomes one `UserError` naming the file and the dotted field. Nothing here imports torch, Ray,
Optuna or MLflow: a spec is data, and `JobSpec.trial_config(params)` turns sampled values into the frozen
configs a trial trains with.

The model is the built-in GPT (`model: {kind: gpt, ...}`, the default) or a local Hugging Face checkpoint
fine-tuned in every trial (`model: {kind: hf, path: DIR}`). For a checkpoint, validation reads its files and
config.json (no torch): the folder, config.json, a supported model_type, the weights, and, for text data
without `dataset.tokenizer`, the tokenizer in DIR, which then tokenises the text. `ssa.layers` resolves
against the checkpoint's number of layers. What an HF model cannot do is an error here, not a surprise in a
trial: the sparsity regulariser (`ssa.sparsity_weight` > 0 with a target) needs the built-in layer's
sampled attention rows.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checks
from .config import (Checkpoint, GPTConfig, HFModelConfig, ModelConfig, SSAConfig, TrainConfig, _yaml_load,
                     model_config, read_checkpoint)
from . import verdict as vd
from .errors import UserError

SECTIONS = ("name", "dataset", "model", "train", "ssa", "search", "objective", "budget", "scheduler",
            "resources", "sampler", "storage", "tracking", "baseline", "robustness", "select", "verdict")
# What every trial reports at each evaluation, and only at its end (see `JobSpec.reported_metrics`).
EVERY_EVAL = ("step", "progress", "train_loss", "lr", "tokens", "tokens_per_s", "train_seconds", "val_loss",
              "val_ppl", "val_loss_at_start", "val_ppl_at_start", "peak_mem_mb", "seconds", "setup_seconds")
AT_END = ("test_loss", "test_ppl", "latency_ms_per_token", "n_params", "ssa_params", "trainable_params")
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
    checkpoint: Checkpoint | None = None  # what config.json of a `kind: hf` model says (read at validation)

    @property
    def model_kind(self) -> str:
        return self.model.get("kind", "gpt")

    select: dict | None = None
    # how the confirmation decides: {margin (None: the metric's default), max_cost: {cost metric: ratio}}
    verdict: dict = field(default_factory=lambda: {"margin": None, "max_cost": dict(vd.DEFAULT_MAX_COST)})

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def reported_metrics(self) -> tuple[set[str], set[str]]:
        """(metrics reported at every evaluation, metrics reported only at a trial's end) for this spec's
        dataset and model: an objective must be one of them, early stopping needs one of the first."""
        from .data import KIND_REPORTS

        every, end = set(EVERY_EVAL), set(AT_END)
        reports = KIND_REPORTS.get(self.dataset.get("kind"), ())
        if "acc" in reports:
            every.add("val_acc"), end.add("test_acc")
        if "gap" in reports:
            every.add("val_gap"), end.add("test_gap")
        if "probes" in reports:
            every.add("passkey_acc")
        if self.ssa is not None and self.model.get("kind", "gpt") == "gpt":  # the built-in layer's statistics
            every.update(f"ssa.{k}_{s}" for k in ("entropy", "topk_mass", "tau_q", "tau_v") for s in ("mean", "std"))
        return every, end

    @property
    def scheduler_metric(self) -> tuple[str, str]:
        """(metric, "min" | "max") early stopping watches: scheduler.metric, else the first objective."""
        metric = self.scheduler.get("metric") or self.objectives[0].metric
        mode = self.scheduler.get("mode")
        if mode is None:
            by_objective = {o.metric: o.direction for o in self.objectives}
            direction = by_objective.get(metric, "maximize" if metric.endswith("acc") else "minimize")
            mode = "min" if direction == "minimize" else "max"
        return metric, mode

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
        model_defaults = ({k: v for k, v in HFModelConfig(path="-").to_dict().items() if k != "path"}
                          if self.model_kind == "hf" else GPTConfig().to_dict())
        defaults = {"model": model_defaults, "train": TrainConfig().to_dict(),
                    "ssa": SSAConfig().to_dict() if self.ssa is not None else {}}
        for section in ("dataset", "model", "train", "ssa"):
            values = {**defaults.get(section, {}), **(getattr(self, section) or {})}
            for k, v in values.items():
                out[f"{section}.{k}"] = v
                if isinstance(v, dict):  # ssa.layers: {count, placement} -> ssa.layers.count too
                    out.update({f"{section}.{k}.{sub}": x for sub, x in v.items()})
        out[SSA_SWITCH] = self.ssa is not None
        return out

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict(_apply(self.train, params, "train"))

    def trial_config(self, params: dict[str, Any]) -> tuple[dict, ModelConfig, TrainConfig, SSAConfig | None]:
        """The frozen configs of one trial from sampled `params` (dotted keys) over the fixed sections.

        Raises ValueError for values that are valid alone but not together (a layer count above the model's
        depth, `train.freeze: base` without SSA, the sparsity regulariser on a Hugging Face model)."""
        dataset = _apply(self.dataset, params, "dataset")
        model = model_config(_apply(self.model, params, "model"))
        tokenizer = _default_tokenizer(model.to_dict(), dataset)
        if tokenizer is not None:  # text data of a Hugging Face checkpoint: its own tokenizer encodes it
            dataset["tokenizer"] = tokenizer
        train = TrainConfig.from_dict(_apply(self.train, params, "train"))
        enabled = params.get(SSA_SWITCH, self.ssa is not None)
        ssa = None
        if enabled:
            ssa = SSAConfig.from_dict(_apply(self.ssa or {}, params, "ssa"))
        self._check_together(model, train, ssa)
        return dataset, model, train, ssa

    def n_layer(self, model: ModelConfig | None = None) -> int | None:
        """The depth `ssa.layers` resolves against: the built-in model's n_layer or the checkpoint's."""
        model = model_config(self.model) if model is None else model
        if isinstance(model, HFModelConfig):
            return self.checkpoint.n_layer if self.checkpoint is not None else None
        return model.n_layer

    def freeze_layers(self):
        """The layer selection `train.freeze: below` refers to in a trial without SSA (the baseline arm): the
        spec's fixed `ssa.layers` (all layers when the spec has no `ssa:` section), so that the baseline
        trains the same base layers as the SSA arm's fixed configuration. (When the search samples
        `ssa.layers`, the baseline keeps this fixed selection: layers are an SSA knob.)"""
        return SSAConfig.from_dict(self.ssa or {}).layers

    def _check_together(self, model: ModelConfig, train: TrainConfig, ssa: SSAConfig | None) -> None:
        n_layer = self.n_layer(model)
        if ssa is not None and n_layer is not None:
            try:
                ssa.resolve_layers(n_layer)
            except ValueError as e:
                raise ValueError(f"ssa.{e}") from None
        if ssa is None and train.freeze == "base":
            raise ValueError("train.freeze: base trains only the SSA parameters, and a trial without SSA has none "
                             "(the unchanged model is that baseline: every trial reports val_loss_at_start)")
        if ssa is not None and isinstance(model, HFModelConfig) and ssa.uses_sparsity:
            raise ValueError("ssa.sparsity_weight: the sparsity regulariser needs the built-in model's sampled "
                             "attention rows (model.kind: gpt); a Hugging Face model has none, set it to 0")

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

    base = Path(base_dir) if base_dir else Path.cwd()
    dataset = dict(_mapping(raw, "dataset", file, required=True))
    model = dict(_mapping(raw, "model", file))
    checkpoint = _check_model(model, dataset, file, base)
    _check_dataset(dataset, file, check_data, base, _default_tokenizer(model, dataset))
    train = dict(_mapping(raw, "train", file))
    ssa_raw = raw.get("ssa", {})
    if ssa_raw is not None and not isinstance(ssa_raw, dict):
        raise _err(file, "ssa", f"must be a mapping or null, got {type(ssa_raw).__name__}")
    ssa = None if ssa_raw is None else dict(ssa_raw)
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

    scheduler = {"kind": "asha", "grace_steps": None, "reduction_factor": 3, "metric": None, "mode": None,
                 **_mapping(raw, "scheduler", file)}
    _unknown(scheduler, {"kind", "grace_steps", "reduction_factor", "metric", "mode"}, file, "scheduler")
    if scheduler["mode"] is not None and scheduler["mode"] not in ("min", "max"):
        raise _err(file, "scheduler.mode", f"must be min or max, got {scheduler['mode']!r}")
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
        if scheduler["kind"] != "none" and not scheduler["metric"]:
            raise _err(file, "scheduler.metric", "several objectives: say which metric early stopping watches "
                       "(one reported at every evaluation, e.g. val_loss), or use scheduler.kind: none")

    for key in ("storage", "tracking"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, str) or not v):
            raise _err(file, key, f"must be a URL string or null, got {v!r}")
    robustness = _check_robustness(raw.get("robustness"), file)

    raw = {**raw, "dataset": dataset}  # with the dataset path made absolute: workers run elsewhere
    if "model" in raw:  # likewise the checkpoint's path
        raw["model"] = model
    spec = JobSpec(path=file, name=name, dataset=dataset, model=model, train=train, ssa=ssa,
                   search=search, objectives=objectives, n_trials=n_trials, time_limit_s=time_limit,
                   scheduler=scheduler, resources=resources, sampler=sampler, storage=raw.get("storage"),
                   tracking=raw.get("tracking"), baseline=baseline, robustness=robustness, baseline_share=share,
                   raw=raw, checkpoint=checkpoint, select=_check_select(raw.get("select"), file),
                   verdict=_check_verdict(raw.get("verdict"), file))
    _check_metrics(spec)
    _check_freeze(spec)
    for arm in spec.arms:  # the fixed settings of each arm go together
        try:
            spec.trial_config({SSA_SWITCH: arm == "ssa"})
        except ValueError as e:
            head, sep, rest = str(e).partition(": ")
            raise (_err(file, head, rest) if sep and " " not in head else _err(file, "spec", str(e))) from None
    _check_search_values(spec)
    if spec.ssa is None and any(p.name.startswith("ssa.") for p in search):
        raise _err(file, "ssa", "null (SSA off) but the search has ssa.* parameters")
    return spec


def _check_verdict(v, file: str) -> dict:
    """`verdict: {margin: 0.005 | "1%", max_cost: {latency_ms_per_token: 1.10, peak_mem_mb: 1.25}}`."""
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise _err(file, "verdict", "must be a mapping {margin: NUMBER or \"P%\", max_cost: {METRIC: RATIO}}")
    _unknown(v, {"margin", "max_cost"}, file, "verdict")
    margin = v.get("margin")
    if margin is not None:
        try:
            vd.parse_margin(margin)
        except ValueError as e:
            raise _err(file, "verdict.margin", str(e)) from None
    max_cost = v.get("max_cost", vd.DEFAULT_MAX_COST)
    if max_cost is None:
        max_cost = {}
    if not isinstance(max_cost, dict):
        raise _err(file, "verdict.max_cost", "must be a mapping {cost metric: largest SSA / baseline ratio}")
    for k, x in max_cost.items():
        if k not in vd.COST_NAMES:
            raise _err(file, f"verdict.max_cost.{k}", f"unknown cost (known: {', '.join(vd.COST_NAMES)})")
        _number(file, f"verdict.max_cost.{k}", x, float, 0)
        if x <= 0:
            raise _err(file, f"verdict.max_cost.{k}", f"must be > 0, got {x!r}")
    return {"margin": margin, "max_cost": {k: float(x) for k, x in max_cost.items()}}


def _check_select(sel, file: str) -> dict | None:
    """`select: {where: ["latency_ms_per_token <= 0.6"], pick: val_loss}`: how the winner is chosen."""
    if sel is None:
        return None
    if not isinstance(sel, dict):
        raise _err(file, "select", "must be a mapping {where: [conditions], pick: METRIC}")
    _unknown(sel, {"where", "pick"}, file, "select")
    pick = sel.get("pick")
    if not isinstance(pick, str) or not pick:
        raise _err(file, "select.pick", "required: the metric to pick by (max:METRIC / min:METRIC to say which way)")
    where = sel.get("where") or []
    if isinstance(where, str):
        where = [where]
    if not isinstance(where, list) or not all(isinstance(w, str) for w in where):
        raise _err(file, "select.where", "must be a list of conditions like 'latency_ms_per_token <= 0.6'")
    from .selection import Rule, pick_direction

    try:
        Rule.parse(where, pick_direction(pick, {})[0], "minimize")
    except ValueError as e:
        raise _err(file, "select.where", str(e).split(": ", 1)[1]) from None
    return {"where": list(where), "pick": pick}


def _check_metrics(spec: JobSpec) -> None:
    """Objectives, the scheduler's metric and the select rule name metrics the trials report; early stopping
    watches one reported at every evaluation."""
    every, end = spec.reported_metrics()
    reported = ", ".join(sorted(every | end))

    def known(metric: str, field: str) -> None:
        if metric not in every | end:
            raise _err(spec.path, field, f"{metric} is not a metric this study reports (it reports: {reported})")

    for i, o in enumerate(spec.objectives):
        known(o.metric, "objective.metric" if not spec.multi_objective else f"objective.{i}.metric")
    if spec.scheduler["kind"] != "none":
        metric, _ = spec.scheduler_metric
        known(metric, "scheduler.metric")
        if metric in end:
            raise _err(spec.path, "scheduler.metric", f"{metric} is reported only at the end of a trial: early "
                       "stopping needs a metric of every evaluation (set scheduler.metric, e.g. val_loss, or "
                       "scheduler.kind: none)")
    if spec.select:
        from .selection import Rule, pick_direction

        for w in spec.select["where"]:
            for cond in Rule.parse([w], "val_loss", "minimize").where:
                known(cond.metric, "select.where")
        known(pick_direction(spec.select["pick"], {})[0], "select.pick")


def _unknown(d: dict, known: set, file: str, section: str) -> None:
    for k in d:
        if k not in known:
            raise _err(file, f"{section}.{k}", f"unknown key (expected one of: {', '.join(sorted(known))})")


def _check_dataset(dataset: dict, file: str, check_data: bool, base_dir: Path, tokenizer: str | None = None) -> None:
    from .data import DATASET_KINDS, KIND_PARAMS, DataError, check_dataset

    kind = dataset.get("kind")
    if kind not in DATASET_KINDS:
        raise _err(file, "dataset.kind", f"must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    _unknown({k: v for k, v in dataset.items() if k != "kind"}, set(KIND_PARAMS[kind]), file, "dataset")
    for key in ("path", "tokenizer"):
        if dataset.get(key) is None or not isinstance(dataset[key], str):
            continue  # (a wrong type is the dataset's own error)
        p = _resolve(dataset[key], base_dir)
        if not p.exists():
            raise _err(file, f"dataset.{key}", f"{dataset[key]}: no such file or directory")
        dataset[key] = str(p)
    if check_data:
        try:
            check_dataset(dataset if tokenizer is None else {**dataset, "tokenizer": tokenizer})
        except DataError as e:  # its message is "dataset.FIELD: reason"
            head, _, rest = str(e).partition(": ")
            raise _err(file, head, rest) from None
        except (ValueError, TypeError) as e:
            raise _err(file, "dataset", str(e)) from None


def _resolve(path: str, base_dir: Path) -> Path:
    """A path of the spec: relative to where the user stands (or the job's working dir)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


TOKENISED_KINDS = ("text", "builtin")  # dataset kinds that read text: a checkpoint's tokenizer encodes them


def _check_model(model: dict, dataset: dict, file: str, base_dir: Path) -> Checkpoint | None:
    """Check the `model:` section; for `kind: hf` check the checkpoint folder (its path made absolute in
    `model`) and, for text data without a tokenizer of its own, that the checkpoint has one to encode it."""
    try:
        cfg = model_config(model)
    except (ValueError, TypeError) as e:
        raise _field_error(file, "model", e) from None
    if not isinstance(cfg, HFModelConfig):
        return None
    p = _resolve(cfg.path, base_dir)
    try:
        checkpoint = read_checkpoint(p)
    except ValueError as e:
        raise _err(file, "model.path", str(e).replace(str(p), cfg.path, 1)) from None
    model["path"] = str(p)
    if dataset.get("kind") in TOKENISED_KINDS and dataset.get("tokenizer") is None:
        if not checkpoint.has_tokenizer:
            raise _err(file, "model.path", f"{cfg.path}: no tokenizer there (tokenizer.json, or tokenizer_config.json "
                       f"with its vocabulary); save one with the model or give dataset.tokenizer")
    seq_len = dataset.get("seq_len")
    if (checkpoint.max_positions and isinstance(seq_len, int) and not isinstance(seq_len, bool)
            and seq_len > checkpoint.max_positions):
        raise _err(file, "dataset.seq_len", f"{seq_len} exceeds the {checkpoint.max_positions} positions of the "
                   f"checkpoint (model.path)")
    return checkpoint


def _default_tokenizer(model: dict, dataset: dict) -> str | None:
    """The tokenizer a trial encodes text with when the spec names none: a Hugging Face checkpoint's own.
    (Given to the trial's dataset by `trial_config`, not written into the spec: a job ships the folder once.)"""
    if model.get("kind") == "hf" and dataset.get("kind") in TOKENISED_KINDS and dataset.get("tokenizer") is None:
        return model.get("path")
    return None


def _check_freeze(spec: JobSpec) -> None:
    """`train.freeze: base` trains only the SSA parameters: a baseline arm would train nothing."""
    if "baseline" not in spec.arms:
        return
    why = ("base trains only the SSA parameters and the baseline arm has none; with base, the unchanged model is "
           "the baseline (every trial reports val_loss_at_start): set `baseline: false`, or freeze: below")
    searched = {p.name: p for p in spec.search}
    if "train.freeze" in searched and "base" in searched["train.freeze"].choices:
        raise _err(spec.path, "search.train.freeze", why)
    if spec.train_config({}).freeze == "base":
        raise _err(spec.path, "train.freeze", why)


def _check_search(search: dict, file: str) -> tuple[Param, ...]:
    params = []
    names = set()
    for name, p in search.items():
        f = f"search.{name}"
        if not isinstance(name, str) or name.split(".")[0] not in ("dataset", "model", "train", "ssa"):
            raise _err(file, f, "parameter names are dotted keys into dataset, model, train or ssa")
        if name in ("model.kind", "model.path"):
            raise _err(file, f, "the model is not searched: a study tunes one model (its kind and checkpoint are "
                       "fixed in the model section)")
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
    out = {"top_k": 3, "seeds": 3, "confirm_seeds": None, "penalty": 1.0, "long_context": None, "noise": None,
           "constraint": False, **r}
    _unknown(out, {"top_k", "seeds", "confirm_seeds", "penalty", "long_context", "noise", "constraint"}, file,
             "robustness")
    _number(file, "robustness.top_k", out["top_k"], int, 1)
    _number(file, "robustness.seeds", out["seeds"], int, 2)
    out["confirm_seeds"] = _check_confirm(out["confirm_seeds"], file)
    _number(file, "robustness.penalty", out["penalty"], float, 0)
    if not isinstance(out["constraint"], bool):
        raise _err(file, "robustness.constraint", "must be true or false")
    for k in ("long_context", "noise"):
        if out[k] is not None and not isinstance(out[k], dict):
            raise _err(file, f"robustness.{k}", "must be a mapping of dataset settings or null")
    return out


def _check_confirm(c, file: str) -> dict:
    """`confirm_seeds`: {min, max, step} seed pairs (rounds until decided), or one number n (a single look)."""
    f = "robustness.confirm_seeds"
    if c is None:
        return dict(vd.DEFAULT_CONFIRM)
    if isinstance(c, int) and not isinstance(c, bool):
        _number(file, f, c, int, 2)
        return {"min": c, "max": c, "step": 1}
    if not isinstance(c, dict):
        raise _err(file, f, "must be {min: N, max: N, step: N} or a number of seed pairs")
    _unknown(c, set(vd.DEFAULT_CONFIRM), file, f)
    out = {**vd.DEFAULT_CONFIRM, **c}
    if "max" not in c and "min" in c:
        out["max"] = max(out["min"], vd.DEFAULT_CONFIRM["max"])
    for k, lo in (("min", 2), ("max", 2), ("step", 1)):
        _number(file, f"{f}.{k}", out[k], int, lo)
    if out["max"] < out["min"]:
        raise _err(file, f"{f}.max", f"must be >= min ({out['min']}), got {out['max']}")
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
