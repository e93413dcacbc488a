"""`ssa-tune poc MODEL_DIR [DATA] --time 30m`: is SSA worth it for this checkpoint? One command, one time budget.

1. Inspect: the checkpoint (family through the adapter registry, layers, heads, parameters, its tokenizer) and
   the data (tokens in the checkpoint's own tokenizer, the train / validation / test split). Anything wrong is
   one line before anything starts.
2. Probe: a few training steps of the SSA arm and its evaluations, timed on this machine, one trial's threads,
   exactly as a trial runs them (`trial.execute`); the batch is halved until as many trials as run at once fit
   in the memory there (RAM, or GPU memory when there is a GPU). Ray's start and a worker's imports are timed.
3. Plan (`plan`, a pure function of the probe's measurements and the budget): steps per trial, trials per
   arm, early-stopping rungs, the robustness stage's seeds and the sequential confirmation's seed pairs, so
   that the worst case (no trial pruned, the confirmation to its last look) fits in what is left of `--time`.
4. Run the two-arm study from the spec it writes (reusable: `ssa-tune run SPEC`), with deadlines: the search
   starts no trial once the time left is what the selection and the whole confirmation need (a slow start
   costs search trials, not the answer), and a confirmation round that could not end in time is not started
   (said, and stored with the answer). Then the report, and both arms' exports with the decision.

The search space for a pretrained model (README, "Is SSA worth it for my model?"): the top layers converted
(`freeze: below` trains only them and what is above, both arms the same layers, so the contrast is SSA's and
not "more trainable layers"), the position term on, the query and value gates on or off, their token scale,
the temperatures' learning-rate multiplier and the base learning rate, both arms over the same range.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .robustness import HANDOVER_S

# ---------------------------------------------------------------------------------------------- the plan

STEPS = (10, 15, 20, 30, 40, 50, 60, 80, 100, 120, 160, 200, 240, 300, 400, 500, 600, 800, 1000, 1200, 1600,
         2000, 2400, 3000, 4000)
MAX_TRIALS_PER_ARM = 8
MAX_PAIRS = 8  # confirmation seed pairs at most (the decisive-verdict design looks after 3, 4, ... pairs)
SELECT_SEEDS = 2  # each arm's best re-trained on fresh seeds before the confirmation (robustness.seeds)
START_S = 12.0  # per study: Ray, the driver, the first worker (measured: 2.6 + 4.3 s), and after the last run
WORKER_S = 7.0  # of which the first worker and after the last run (measured 4.3 + 2.3 s), when not timed
SPAWN_S = 3.0  # a worker's start beside its imports (timed), and after the last run
REPORT_S = 15.0  # the report (importances, plots) and both exports
RESERVE = 0.05  # of the budget, left unplanned: a machine's noise
CONTENTION = 1.15  # a CPU step when trials share the machine's memory bandwidth, against one alone (probed)


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the probe measured: the plan is a function of this and the budget alone."""

    step_s: float  # one training step of the slower arm, one trial's threads
    eval_s: float  # one evaluation of the validation sequences (and the probes a dataset has)
    end_s: float  # a run's end: the test split and the decode latency
    setup_s: float  # a run's set-up: the checkpoint loaded and converted, the optimizer
    data_s: float  # building the dataset, once per worker (in parallel)
    slots: int  # trials at a time
    spent_s: float = 0.0  # already used (inspecting, probing)
    max_steps: int | None = None  # the data's limit (a few epochs of the training split)
    start_s: float = START_S  # the study's fixed costs: the driver, the first workers, after the last run


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: int
    eval_every: int
    trials_per_arm: int
    select_seeds: int
    confirm_min: int
    confirm_max: int
    run_s: float  # one run, worst case
    parts: dict  # name -> planned seconds (worst case)
    budget_s: float
    limited_by: dict  # dimension -> "time" or "cap" (why it is not larger)

    @property
    def scheduler(self) -> dict:
        if self.trials_per_arm >= 3:  # enough trials to stop the weak ones early: rungs at 1/3 and 2/3 (the
            # ladder's trials come in whole rounds of both arms, so a rung always has trials to compare)
            return {"kind": "asha", "grace_steps": self.eval_every, "reduction_factor": 2}
        return {"kind": "none"}

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())

    def runs(self) -> dict[str, int]:
        return {"search": 2 * self.trials_per_arm, "selection": 2 * self.select_seeds,
                "confirmation": confirm_configs(self.trials_per_arm) * self.confirm_max}


def run_seconds(m: Measured, steps: int, eval_every: int) -> float:
    """One run, as a trial does it: set-up, the evaluation at the start and every `eval_every` steps, the
    steps, the end-of-run measurements and the hand-over to the next."""
    evals = 1 + math.ceil(steps / eval_every)
    return m.setup_s + steps * m.step_s + evals * m.eval_s + m.end_s + HANDOVER_S


def _rounds(runs: int, slots: int) -> int:
    return -(-runs // slots)


def _eval_every(steps: int, tpa: int) -> int:
    """Evaluations every third of a run where ASHA needs rungs (3 trials per arm or more), else once midway
    (the convergence curve's middle point): an evaluation can cost as much as several steps."""
    return max(1, steps // 3 if tpa >= 3 else steps // 2)


def confirm_configs(tpa: int) -> int:
    """Configurations the confirmation trains per seed pair: SSA, the baseline and SSA alone (the baseline with
    SSA's settings), 2 when the last is SSA's own (one trial per arm: both arms run the spec's defaults, the same
    learning rate)."""
    return 2 if tpa == 1 else 3


def _priced(m: Measured, budget_s: float, steps: int, tpa: int, cmax: int) -> Plan:
    every = _eval_every(steps, tpa)
    run_s = run_seconds(m, steps, every)
    cmin = min(3, cmax)
    looks = list(range(cmin, cmax + 1))
    confirm = 0.0
    done = 0
    for k in looks:  # a look's runs (the configurations x its new pairs) all end before the next look starts
        confirm += _rounds(confirm_configs(tpa) * (k - done), m.slots) * run_s
        done = k
    parts = {"probe": m.spent_s, "start": m.start_s + m.data_s,
             "search": _rounds(2 * tpa, m.slots) * run_s,
             "selection": _rounds(2 * SELECT_SEEDS, m.slots) * run_s,
             "confirmation": confirm, "report": REPORT_S}
    return Plan(steps, every, tpa, SELECT_SEEDS, cmin, cmax, run_s, parts, budget_s, {})


def ladder(m: Measured, steps: int | None = None, trials: int | None = None) -> list[tuple[int, int, int]]:
    """The plans in the order they are grown, each one step larger than the one before: (steps, trials per
    arm, confirmation seed pairs at most), in turn longer training (twice: each run nearer convergence, the
    seed noise shrinks, measured ~7x from 300 to 600 steps on the quickstart), more confirmation seed pairs (a
    decision at the margin), more search trials per arm (a tuned learning rate and gates). The order does not
    depend on the budget, so a larger budget never plans less of anything. `steps`, `trials` (per arm): fixed
    (`--steps`, `--trials`)."""
    if steps is not None:
        choices = [steps]
    else:
        choices = [s for s in STEPS if m.max_steps is None or s <= m.max_steps] or [STEPS[0]]
    caps = {"steps": len(choices) - 1, "pairs": MAX_PAIRS, "trials": trials or MAX_TRIALS_PER_ARM}
    state = {"steps": 0, "pairs": 2, "trials": trials or 1}
    out = [(choices[0], state["trials"], 2)]
    while any(state[d] < caps[d] for d in caps):
        for dim in ("steps", "pairs", "steps", "trials"):  # training length first: it settles the seeds
            if state[dim] < caps[dim]:
                state[dim] += 1
                out.append((choices[state["steps"]], state["trials"], state["pairs"]))
    return out


def plan(m: Measured, budget_s: float, steps: int | None = None, trials: int | None = None) -> Plan:
    """The largest plan of the `ladder` whose worst case fits in `budget_s` less a 5 % reserve. Raises UserError
    when not even one trial per arm fits."""
    usable = budget_s * (1 - RESERVE)
    grown = ladder(m, steps, trials)
    chosen = None
    for i, (s, t, c) in enumerate(grown):
        candidate = _priced(m, budget_s, s, t, c)
        if candidate.total_s > usable:
            break
        chosen = (i, candidate)
    if chosen is None:
        smallest = _priced(m, budget_s, *grown[0])
        n = grown[0][1]
        raise UserError(f"{clock(budget_s)} is too short for even {'one trial' if n == 1 else f'{n} trials'} per "
                        f"arm and the confirmation: "
                        f"that needs {clock(smallest.total_s / (1 - RESERVE))} here (one run "
                        f"{smallest.run_s:.0f} s, {m.slots} at a time)", field="--time")
    i, best = chosen
    s, t, c = grown[i]
    top = grown[-1]
    limited = {"steps": "cap" if s == top[0] else "time", "trials": "cap" if t == top[1] else "time",
               "pairs": "cap" if c == top[2] else "time"}
    return dataclasses.replace(best, limited_by=limited)


def deadlines(p: Plan, started: float) -> tuple[float, float]:
    """(the study's deadline, the search's), time.monotonic, for a command started at `started`: the study ends
    in time for the report and the exports; the search starts no trial once the time left is what the selection
    and the whole confirmation need (a slow start costs search trials, not the answer)."""
    end = started + p.budget_s - REPORT_S
    return end, end - p.parts["selection"] - p.parts["confirmation"] - p.run_s


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    mi, s = divmod(rest, 60)
    if h:
        return f"{h}h{mi:02d}m"
    return f"{mi}m{s:02d}s" if mi else f"{s}s"


def describe(p: Plan, m: Measured) -> list[str]:
    """The plan as the user reads it: what runs, how long each part should take at most."""
    sch = p.scheduler
    rungs = (f"ASHA rungs at steps {p.eval_every} and {2 * p.eval_every} (halving)" if sch["kind"] == "asha"
             else "no early stopping (too few trials)")
    runs = p.runs()
    lines = [
        f"one run: {p.steps} steps, evaluated every {p.eval_every} = {p.run_s:.0f} s at most "
        f"({m.step_s:.2f} s a step, {m.eval_s:.1f} s an evaluation, {m.setup_s:.1f} s set-up; {m.slots} at a time)",
        f"  probe          {clock(p.parts['probe']):>8}   (done)",
        f"  start          {clock(p.parts['start']):>8}   Ray, workers, the dataset",
        f"  search         {clock(p.parts['search']):>8}   {runs['search']} trials, {p.trials_per_arm} per arm; {rungs}",
        f"  selection      {clock(p.parts['selection']):>8}   each arm's best on {p.select_seeds} fresh seeds",
        f"  confirmation   {clock(p.parts['confirmation']):>8}   SSA, baseline and SSA alone on {p.confirm_min} to "
        f"{p.confirm_max} new seed pairs, one pair a round, until decided",
        f"  report         {clock(p.parts['report']):>8}   report and both exports",
        f"  total          {clock(p.total_s):>8}   at most, of {clock(p.budget_s)}",
    ]
    why = [f"{dim} ({how})" for dim, how in p.limited_by.items() if how == "time"]
    if why:
        lines.append("limited by the time: " + ", ".join(why))
    return lines


# ---------------------------------------------------------------------------------------------- the inputs

_TIME = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_time(text: str) -> float:
    """'30m', '1h', '1h30m', '90s', '1.5h' -> seconds."""
    m = _TIME.match(text or "")
    if not m or not any(m.groups()):
        raise UserError(f"expected a duration like 30m, 1h, 1h30m or 90s, got {text!r}", field="--time")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mi + s
    if seconds <= 0:
        raise UserError(f"must be more than 0, got {text!r}", field="--time")
    return seconds


def default_layers(n_layer: int) -> int:
    """The top quarter of the stack, at most 4 layers (SmolLM2-135M, 30 layers: 4, as its measured recipe)."""
    return max(1, min(4, n_layer // 4))


def study_name(model_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_dir.resolve().name).strip("-.") or "model"
    return f"poc-{name}"


def inspect(model_dir: Path, data: Path | None) -> dict[str, Any]:
    """The checkpoint and the data, checked and described, without loading any weights. Errors name the
    argument at fault: `error: MODEL_DIR: reason` or `error: DATA: reason`."""
    import json

    from .config import read_checkpoint
    from .hf import FAMILIES

    try:
        ck = read_checkpoint(model_dir)
    except ValueError as e:
        raise UserError(str(e).split(": ", 1)[1] if str(e).startswith(str(model_dir)) else str(e),
                        str(model_dir)) from None
    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    if arch is not None and arch not in FAMILIES:
        raise UserError(f"{arch} is not a model ssa-tune converts (supported: {', '.join(sorted(FAMILIES))})",
                        str(model_dir))
    if not ck.has_tokenizer:
        raise UserError("no tokenizer there (tokenizer.json, or tokenizer_config.json with its vocabulary): the "
                        "PoC encodes the data with the checkpoint's own tokenizer; save it with the model",
                        str(model_dir))
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv = config.get("num_key_value_heads", heads)
    if data is not None:
        if not data.exists():
            raise UserError("no such file or directory", str(data))
        if data.is_file():
            try:
                with data.open("rb") as f:
                    f.read(1)
            except OSError as e:
                raise UserError(f"cannot read: {e.strerror or e}", str(data)) from None
    return {"path": str(model_dir.resolve()), "model_type": ck.model_type, "architecture": arch,
            "n_layer": ck.n_layer, "n_head": heads, "n_kv_head": kv, "max_positions": ck.max_positions,
            "vocab_size": ck.vocab_size}


def dataset_section(data: Path | None, seq_len: int) -> dict[str, Any]:
    """The spec's dataset: the text given, or the embedded default (the built-in Shakespeare corpus)."""
    if data is None:
        return {"kind": "builtin", "seq_len": seq_len, "eval_sequences": 24}
    return {"kind": "text", "path": str(data.resolve()), "seq_len": seq_len, "val_fraction": 0.1,
            "test_fraction": 0.1, "eval_sequences": 24}


def build_spec(name: str, info: dict, dataset: dict, layers: int, batch: int, resources: dict,
               p: Plan | None = None) -> dict[str, Any]:
    """The job spec the PoC runs (the probe's with a 6-step plan when `p` is None)."""
    steps = p.steps if p else 6
    every = p.eval_every if p else 3
    raw: dict[str, Any] = {
        "name": name,
        "dataset": dataset,
        "model": {"kind": "hf", "path": info["path"]},
        "train": {"max_steps": steps, "batch_size": batch, "eval_every": every, "lr": 1.0e-3,
                  "warmup_steps": max(1, steps // 12), "weight_decay": 0.0, "freeze": "below", "latency_tokens": 16},
        "ssa": {"query_position": "log_expexp", "query_gate": "shared", "value_gate": "shared", "token_scale": 0.5,
                "per_head": True, "layers": {"count": layers, "placement": "top"}, "temperature_lr_mult": 10.0},
        "search": {
            "train.lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
            "ssa.temperature_lr_mult": {"type": "float", "low": 3.0, "high": 100.0, "log": True},
            "ssa.query_gate": {"type": "categorical", "choices": ["none", "shared"]},
            "ssa.value_gate": {"type": "categorical", "choices": ["none", "shared"]},
            "ssa.token_scale": {"type": "float", "low": 0.1, "high": 0.9, "when": {"ssa.query_gate": ["shared"]}},
        },
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "budget": {"n_trials": 2 * (p.trials_per_arm if p else 1)},
        "scheduler": p.scheduler if p else {"kind": "none"},
        "resources": resources,
        "sampler": {"kind": "tpe", "seed": 0, "n_startup_trials": 2},
        "robustness": {"top_k": 1, "seeds": p.select_seeds if p else SELECT_SEEDS, "penalty": 1.0,
                       "confirm_seeds": {"min": p.confirm_min if p else 2, "max": p.confirm_max if p else 2,
                                         "step": 1}},
        "verdict": {"margin": "1%"},
    }
    return raw


def machine(cluster: dict | None = None) -> dict[str, Any]:
    """Slots and memory where the PoC runs: one trial per GPU, else a core or more per trial. `cluster`: a Ray
    cluster's resources (ray.cluster_resources()), where the study runs instead of this machine."""
    import psutil

    if cluster:
        cpus, gpus = int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0))
        per = max(1, cpus // max(gpus, 1) if gpus else cpus // 4 or 1)
        mem = float(cluster.get("memory", psutil.virtual_memory().available)) / 2**20
        return {"slots": max(1, gpus or cpus // per), "cpus_per_trial": per, "gpus_per_trial": 1 if gpus else 0,
                "memory_mb": mem, "per_slot_memory": bool(gpus), "device": f"the Ray cluster ({cpus} CPU, {gpus} GPU)"}
    cpus = os.cpu_count() or 1
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus:
        import torch

        mem = min(torch.cuda.mem_get_info(i)[0] for i in range(gpus)) / 2**20
        return {"slots": gpus, "cpus_per_trial": max(1, cpus // gpus), "gpus_per_trial": 1,
                "memory_mb": mem, "per_slot_memory": True, "device": f"{gpus} GPU(s)"}
    per = max(1, cpus // 4)
    return {"slots": max(1, cpus // per), "cpus_per_trial": per, "gpus_per_trial": 0,
            "memory_mb": psutil.virtual_memory().available / 2**20, "per_slot_memory": False,
            "device": f"{cpus} CPU core(s)"}


def probe(spec, cpus: float, gpus: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Time the SSA arm's run of 6 steps (the slower arm: its temperatures add work; the baseline trains the same
    layers) as a trial runs it, on the dataset `trial.dataset_for` keeps: evaluations at 0, 3 and 6, then the
    end-of-run test split and decode latency. The first steps and the first evaluation carry one-time costs:
    a step is timed over steps 4-6, an evaluation as the warm ones at step 6 and on the test split."""
    from .errors import TrialFailed
    from .trial import execute

    arm = "ssa"
    reports: list[dict] = []
    try:
        res = execute(spec, spec.default_params(arm), cpus, gpus, reports.append)
    except TrialFailed as e:
        raise UserError(f"the probe's {arm} run failed: {e.reason}", spec.path) from None
    first, last = reports[0], reports[-1]
    step = (last["train_seconds"] - first["train_seconds"]) / max(1, last["step"] - first["step"])
    # outside training: at step 3 the evaluations at 0 and 3; at 6 also the one at 6, the test split, the latency
    latency = float(last.get("latency_ms_per_token") or 0.0) * spec.train_config({}).latency_tokens / 1000
    warm = (last["seconds"] - last["train_seconds"]) - (first["seconds"] - first["train_seconds"])
    evals = max(1e-3, (warm - latency) / 2)
    first_eval = max(evals, first["seconds"] - first["train_seconds"] - evals)
    out = {"step_s": step, "eval_s": evals, "end_s": first_eval + latency, "setup_s": last["setup_seconds"],
           "peak_mem_mb": float(res.metrics.get("peak_mem_mb") or 0.0)}
    say(f"probe: {arm} arm, {step:.3f} s a step, {evals:.2f} s an evaluation ({first_eval:.2f} s the first), "
        f"{last['setup_seconds']:.1f} s set-up, peak memory {out['peak_mem_mb']:.0f} MiB")
    return out


MIN_SEQUENCES = {"train": 16, "val": 4, "test": 4}  # whole sequences per split a PoC needs at least
EPOCHS = 4  # steps are capped at this many passes over the training split


def check_data(dataset, batch: int, where: str) -> int:
    """The data's size in the checkpoint's tokens against what a PoC needs; returns the step cap."""
    tokens = dataset.split_tokens() if hasattr(dataset, "split_tokens") else {}
    T = dataset.seq_len
    short = {s: n for s, n in tokens.items() if n < MIN_SEQUENCES[s] * T + 1}
    if short:
        have = ", ".join(f"{s} {tokens[s]}" for s in ("train", "val", "test"))
        need = ", ".join(f"{s} {MIN_SEQUENCES[s] * T + 1}" for s in ("train", "val", "test"))
        raise UserError(f"too little text for a PoC: {sum(tokens.values())} tokens in the checkpoint's tokenizer "
                        f"(train / validation / test: {have}); needs at least {need} (sequences of {T}) - give "
                        f"more text, or --seq-len smaller", where)
    return max(1, EPOCHS * tokens.get("train", 0) // (batch * T)) if tokens else None


@dataclasses.dataclass
class Prepared:
    name: str
    out_dir: Path
    info: dict
    raw: dict  # the spec to run
    plan: Plan
    measured: Measured
    more: Plan | None  # what twice the time would buy
    machine: dict
    batch: int
    layers: int
    data_tokens: dict


def prepare(model_dir: Path, data: Path | None, budget_s: float, out_dir: Path | None, layers: int | None,
            seq_len: int | None, started: float, say: Callable[[str], None], for_run: bool = True,
            steps: int | None = None, address: str | None = None, trials: int | None = None) -> Prepared:
    """Inspect, probe and plan (everything before the study starts). `started`: time.monotonic() at the
    command's start (the probe's time counts against the budget)."""
    from .spec import validate

    info = inspect(model_dir, data)
    name = study_name(model_dir)
    out_dir = (out_dir or Path(name)).resolve()
    if for_run and (out_dir / "optuna.db").exists():
        raise UserError(f"already holds a PoC study (`ssa-tune resume {name} --workdir {out_dir}` continues it, "
                        f"`ssa-tune report {name} --workdir {out_dir}` shows it); choose another --out", str(out_dir))
    n_layer = info["n_layer"]
    layers = default_layers(n_layer) if layers is None else layers
    if not 1 <= layers <= n_layer:
        raise UserError(f"must be between 1 and the checkpoint's {n_layer} layers, got {layers}", field="--layers")
    limit = info["max_positions"] or 128
    if seq_len is not None and not 8 <= seq_len <= limit:
        raise UserError(f"must be between 8 and the checkpoint's {limit} positions, got {seq_len}", field="--seq-len")
    seq_len = seq_len or min(128, limit)
    if trials is not None and not 1 <= trials <= 64:
        raise UserError(f"must be between 1 and 64 trials per arm, got {trials}", field="--trials")
    if steps is not None and steps < 3:
        raise UserError(f"must be at least 3 (evaluations every third of a run), got {steps}", field="--steps")
    mach = machine()
    dataset = dataset_section(data, seq_len)
    spec_path = str(out_dir / f"{name}.yaml")
    where = str(data) if data is not None else "builtin corpus"

    def checked(batch: int, mach: dict, slots: int):
        """The probe's spec, validated (its data read and checked); a fault named by the argument given."""
        resources = {"cpus_per_trial": mach["cpus_per_trial"], "gpus_per_trial": mach["gpus_per_trial"],
                     "max_concurrent": slots}
        try:
            return validate(build_spec(name, info, dataset, layers, batch, resources), spec_path)
        except UserError as e:  # the data's or the checkpoint's fault, named by the argument given
            about_data = (e.field or "").startswith("dataset") and data is not None
            reason = e.reason
            for p in ((str(data), str(data.resolve())) if about_data else ()):
                reason = reason[len(p) + 2:] if reason.startswith(p + ": ") else reason
            if about_data and " tokens" in reason:
                reason = f"too little text for a PoC: {reason}"
            raise UserError(reason, str(data) if about_data else str(model_dir)) from None

    # the data, read and encoded once here (and kept: the workers read the encoding), is checked before Ray starts
    from .data import build_dataset
    from .trial import dataset_for

    d, _, tc, _ = checked(4, mach, mach["slots"]).trial_config({})
    dataset_obj = dataset_for(d, tc.seed)
    check_data(dataset_obj, 4, where)
    t = time.perf_counter()
    build_dataset(d, seed=tc.seed)  # what each worker's first trial pays: the text read, its encoding read back
    data_s = time.perf_counter() - t
    imports = _start_import_timer()  # a worker's imports, timed in a fresh process beside the probe
    ray_s, cluster = None, None
    if for_run:  # Ray starts now, timed (the study needs it): its cost is measured, not guessed
        from .tune.cluster import init_ray

        t = time.perf_counter()
        init_ray(address)  # before `import ray`: a cluster's token is read when Ray is first imported
        ray_s = time.perf_counter() - t
        if address:
            import ray

            cluster = ray.cluster_resources()
            mach = machine(cluster=cluster)
    say(f"poc: {info['architecture'] or info['model_type']}, {n_layer} layers, {info['n_head']} heads "
        f"({info['n_kv_head']} key/value); SSA in the top {layers}, trained with what is above them; "
        f"{mach['device']}, {mach['slots']} trial(s) at a time")
    batch, slots = 4, mach["slots"]
    while True:
        pr = probe(checked(batch, mach, slots), mach["cpus_per_trial"], mach["gpus_per_trial"], say)
        peak = pr["peak_mem_mb"]
        room = 0.8 * mach["memory_mb"] if mach["per_slot_memory"] else 0.7 * mach["memory_mb"]
        fit = int(room // max(peak, 1.0)) if not mach["per_slot_memory"] else (slots if peak <= room else 0)
        if fit >= 1:
            slots = min(slots, fit)
            break
        if batch == 1:
            raise UserError(f"one trial needs ~{peak:.0f} MiB at batch 1 x {seq_len}, more than the "
                            f"{mach['memory_mb']:.0f} MiB here; try --seq-len smaller", str(model_dir))
        batch //= 2
        say(f"probe: ~{peak:.0f} MiB a trial does not fit in {room:.0f} MiB: batch {batch}")
    # the study's fixed costs: Ray's start and a worker's imports as timed here, else the measured defaults
    imports_s = _imports_seconds(imports)
    if imports_s is not None:
        start_s = (ray_s or 0.0) + imports_s + SPAWN_S
    else:
        start_s = START_S if ray_s is None else ray_s + WORKER_S
    contention = CONTENTION if slots > 1 and not mach["gpus_per_trial"] else 1.0
    m = Measured(step_s=contention * pr["step_s"], eval_s=contention * pr["eval_s"], end_s=contention * pr["end_s"],
                 setup_s=pr["setup_s"], data_s=data_s, slots=slots, spent_s=time.monotonic() - started,
                 max_steps=check_data(dataset_obj, batch, where), start_s=start_s)
    p = plan(m, budget_s, steps, trials)
    try:
        more = plan(m, 2 * budget_s, steps, trials)
    except UserError:
        more = None
    resources = {"cpus_per_trial": mach["cpus_per_trial"], "gpus_per_trial": mach["gpus_per_trial"],
                 "max_concurrent": slots}
    raw = build_spec(name, info, dataset, layers, batch, resources, p)
    return Prepared(name, out_dir, info, raw, p, m, more, {**mach, "slots": slots}, batch, layers,
                    dataset_obj.split_tokens() if hasattr(dataset_obj, "split_tokens") else {})


_IMPORTS = ("import time; t = time.perf_counter(); import torch, transformers, ssa_tune.train, ssa_tune.hf, "
            "ssa_tune.trial; print(time.perf_counter() - t)")


def _start_import_timer():
    """A fresh interpreter importing what a trial worker imports: how long a worker's start takes on this
    machine now (its load included), measured while the probe runs."""
    import subprocess
    import sys

    try:
        return subprocess.Popen([sys.executable, "-c", _IMPORTS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
    except OSError:
        return None


def _imports_seconds(proc) -> float | None:
    import subprocess

    if proc is None:
        return None
    try:
        out, _ = proc.communicate(timeout=120)
        return float(out.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        proc.kill()
        return None


def spec_text(prep: Prepared, budget_s: float) -> str:
    """The spec as written: YAML, its header the plan it was made for."""
    import yaml

    p = prep.plan
    head = [f"# written by `ssa-tune poc` for --time {clock(budget_s)}: {p.steps} steps a run, "
            f"{p.trials_per_arm} trial(s) per arm, each arm's best on {p.select_seeds} seeds, then {p.confirm_min} to "
            f"{p.confirm_max} seed pairs until decided; worst case {clock(p.total_s)}.",
            f"# Measured here: {prep.measured.step_s:.3f} s a step, {prep.measured.eval_s:.2f} s an evaluation, "
            f"{prep.measured.slots} trial(s) at a time. Re-run it as it is: ssa-tune run THIS_FILE"]
    return "\n".join(head) + "\n" + yaml.safe_dump(prep.raw, sort_keys=False, width=120)


def export_arms(study_name_: str, target, out_dir: Path, say: Callable[[str], None]) -> dict[str, str | None]:
    """Both arms' configurations (each arm's robust best, the ones the verdict compared), with the decision and
    the recommendation in their `source`; an arm with nothing to export is said, not fatal."""
    import optuna

    from . import study as st
    from .export import export_best

    loaded = optuna.load_study(study_name=study_name_, storage=st.open_storage(target.storage))
    paths: dict[str, str | None] = {}
    for arm in ("ssa", "baseline"):
        try:
            path, _ = export_best(loaded, target, out_dir / f"{arm}.yaml", None, arm)
            paths[arm] = str(path)
        except UserError as e:
            say(f"export: the {arm} arm: not exported: {e.reason}")
            paths[arm] = None
    return paths


def record(prep: Prepared, budget_s: float, summary: dict, robust: dict | None, exports: dict,
           times: dict) -> dict[str, Any]:
    """What the PoC did, as `poc.json` keeps it (beside the spec, the study, the report and the exports)."""
    import json

    verdict = (robust or {}).get("verdict") or {}
    cuts = []
    planned = prep.raw["budget"]["n_trials"]
    c = summary.get("trials") or {}
    ran = sum(int(c.get(k) or 0) for k in ("complete", "pruned", "failed"))
    if ran < planned:
        cuts.append(f"the search ran {ran} of its {planned} trials: the time left had to keep the selection and "
                    f"the whole confirmation")
    if (robust or {}).get("cut"):
        cuts.append(robust["cut"])
    rec = {"model": prep.info, "data_tokens": prep.data_tokens, "batch_size": prep.batch, "layers": prep.layers,
           "machine": {k: v for k, v in prep.machine.items() if k != "memory_mb"},
           "measured": dataclasses.asdict(prep.measured),
           "plan": {**dataclasses.asdict(prep.plan), "scheduler": prep.plan.scheduler,
                    "total_s": prep.plan.total_s},
           "time": {"asked_s": budget_s, **{f"{k}_s": round(v, 1) for k, v in times.items()}},
           "trials": summary.get("trials"), "decision": summary.get("decision") or verdict.get("decision"),
           "verdict": summary.get("verdict"), "recommendation": summary.get("recommendation"),
           "cut": cuts, "report": summary.get("report"), "exports": exports,
           "study": summary.get("study"), "workdir": str(prep.out_dir)}
    (prep.out_dir / "poc.json").write_text(json.dumps(rec, indent=2, default=str))
    return rec


def closing(rec: dict) -> list[str]:
    t = rec["time"]
    lines = [f"poc {rec['study']}: decision: {rec['decision'] or 'none (no confirmation ran)'}"]
    if rec.get("verdict"):
        lines.append(f"  verdict: {rec['verdict']}")
    if rec.get("recommendation"):
        lines.append(f"  recommendation: {rec['recommendation']}")
    for cut in rec.get("cut") or []:
        lines.append(f"  cut: {cut}")
    lines.append(f"  report: {rec['report']}")
    for arm, path in rec["exports"].items():
        lines.append(f"  export ({arm} arm): {path or 'none'}")
    lines.append(f"  time: asked {clock(t['asked_s'])}, took {clock(t['total_s'])} (probe and plan "
                 f"{clock(t['probe_s'])}, study and report {clock(t['study_s'])}, exports {clock(t['exports_s'])})")
    lines.append(f"  everything in {rec['workdir']} (poc.json; ssa-tune ui --workdir {rec['workdir']})")
    return lines
