"""The robustness stage: re-train the study's best configurations on fresh seeds, pick the robust winner,
then confirm SSA against the baseline on seeds nobody chose anything on.

1. Selection: the top-k trials, the best trial of each arm, each re-trained on `seeds` fresh training seeds
   (10000, 10001, ...), plus the optional long-context and noise variants. The robust winner has the best
   robust score (mean + penalty x std, failed seeds counting as the worst value seen).
2. Confirmation: the best SSA configuration and the best baseline configuration of step 1, re-trained on
   `confirm_seeds` further seeds (20000, ...). The verdict is the paired difference over those seeds, so the
   runs that picked the SSA configuration are never the runs that test it (no winner's curse).

Seeds vary training only (batches, initialisation): every run is evaluated on the same validation data
(`dataset.eval_seed` fixed to the study's), so the spread is the model's, not the evaluation set's.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Callable

from optuna.trial import TrialState

from . import analyse
from . import study as st
from . import tune
from .driver import Target, open_mirror
from .errors import UserError
from .spec import SSA_SWITCH, JobSpec, validate
from .trial import execute, failure_reason, trial_params

DEFAULTS = {"top_k": 3, "seeds": 3, "confirm_seeds": None, "penalty": 1.0, "long_context": None, "noise": None,
            "constraint": False}
ATTR_ROBUSTNESS = "ssa_tune.robustness"
SELECT_SEED, CONFIRM_SEED = 10_000, 20_000
COSTS = ("latency_ms_per_token", "peak_mem_mb", "n_params", "tokens_per_s")


def _variant_spec(spec: JobSpec, dataset_override: dict | None) -> JobSpec:
    """The spec with another dataset (an override with `kind` replaces it, one without is merged)."""
    if not dataset_override:
        return spec
    dataset = dict(dataset_override) if "kind" in dataset_override else {**spec.dataset, **dataset_override}
    return validate({**spec.raw, "dataset": dataset}, spec.path, check_data=False)


def _job(spec_json: str, spec_path: str, params: dict, cpus: float, gpus: float) -> dict:
    """One robustness run on a worker: its final metrics and every evaluation."""
    import os

    try:  # relative paths are data shipped with a Ray job, unpacked in this worker's working dir
        base = os.getcwd()
    except FileNotFoundError:
        base = None
    spec = validate(json.loads(spec_json), spec_path, check_data=False, base_dir=base)
    history: list[dict] = []
    try:
        result = execute(spec, params, cpus, gpus, report=history.append)
        return {"ok": True, "metrics": result.metrics, "history": history}
    except Exception as e:  # noqa: BLE001 - a failed run is a result too
        return {"ok": False, "reason": failure_reason(e), "history": history}


def _eval_seed(spec: JobSpec) -> int:
    """The evaluation data every robustness run is scored on: the study's own."""
    es = spec.dataset.get("eval_seed")
    return int(es) if es is not None else int(spec.train_config({}).seed)


def run_robustness(study, spec: JobSpec, target: Target, out: Callable[[str], None] = print,
                   address: str | None = None) -> dict[str, Any]:
    r = {**DEFAULTS, **(spec.robustness or {})}
    objective = spec.objectives[0]
    sign = 1 if objective.direction == "minimize" else -1
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0])]
    if not done:
        raise UserError(f"study {study.study_name!r} has no complete trial to re-run", field="STUDY")
    configs = {f"trial-{t.number}": dict(t.params) for t in analyse.pick_top(study, int(r["top_k"]))}
    arm_of_config = {f"trial-{t.number}": st.arm_of(t) for t in done}
    best_of_arm: dict[str, str] = {}
    for arm in spec.arms:
        members = [t for t in done if st.arm_of(t) == arm]
        if members:
            b = min(members, key=lambda t: (sign * t.values[0], t.number))
            best_of_arm[arm] = f"trial-{b.number}"
            configs.setdefault(best_of_arm[arm], dict(b.params))
    if len(spec.arms) > 1 and "baseline" not in best_of_arm:  # no baseline finished: its default still takes part
        configs["baseline"] = spec.baseline_params()
        arm_of_config["baseline"] = "baseline"
        best_of_arm["baseline"] = "baseline"
    eval_seed = _eval_seed(spec)
    seeds = [SELECT_SEED + i for i in range(int(r["seeds"]))]
    confirm = [CONFIRM_SEED + i for i in range(int(r["confirm_seeds"] or r["seeds"]))]
    variants = {"main": spec}
    for name in ("long_context", "noise"):
        if r.get(name):
            variants[name] = _variant_spec(spec, r[name])

    tune.init_ray(address)
    mirror = open_mirror(study, target)
    cpus, gpus = float(spec.resources["cpus_per_trial"]), float(spec.resources["gpus_per_trial"])
    limit = int(spec.resources["max_concurrent"])
    results: dict[tuple, dict] = {}

    def run(batch: list[tuple[str, str, str, int, dict]], label: str) -> None:
        """batch: (stage, config id, variant, seed, params); each run is a nested MLflow run of the study."""
        jobs, keys = [], []
        for stage, cid, vname, seed, params in batch:
            vspec = variants[vname]
            p = {**params, "train.seed": seed, "dataset.eval_seed": eval_seed}
            d, m, t, s = vspec.trial_config(p)
            key = f"robust-{cid}-{vname}-s{seed}"
            mirror.create(key, key, trial_params(d, m, t, s),
                          {"ssa_tune.role": "robustness", "ssa_tune.stage": stage, "ssa_tune.config": cid,
                           "ssa_tune.seed": seed, "ssa_tune.variant": vname,
                           "ssa_tune.arm": arm_of_config.get(cid, "ssa" if p.get(SSA_SWITCH, True) else "baseline")})
            jobs.append((json.dumps(tune.portable_raw(vspec), default=str), spec.path, p, cpus, gpus))
            keys.append((stage, cid, vname, seed, key))
        out(f"robustness ({label}): {len(jobs)} runs")

        def done_one(i: int, res: dict) -> None:
            stage, cid, vname, seed, key = keys[i]
            for h in res.get("history", []):
                mirror.metrics(key, h, int(h.get("step", 0)))
            if res["ok"]:
                mirror.metrics(key, res["metrics"], int(res["metrics"].get("step", 0)))
            mirror.finish(key, "COMPLETE" if res["ok"] else "FAIL", res.get("reason"))
            results[(stage, cid, vname, seed)] = res
            value = res["metrics"].get(objective.metric) if res["ok"] else None
            out(f"  robust {stage:<7} {cid:<10} {vname:<12} seed {seed}: {objective.metric}={tune._fmt(value)}"
                + ("" if res["ok"] else f" ({res['reason']})"))

        tune.run_tasks(_job, jobs, spec.trial_resources(), limit, done_one)

    def table(stage: str, variant: str, metric: str, ids=None, stage_seeds=None) -> dict[str, list]:
        ids = list(configs) if ids is None else ids
        rows: dict[str, list] = {}
        for cid in ids:
            rows[cid] = []
            for seed in (stage_seeds or seeds):
                res = results.get((stage, cid, variant, seed))
                v = res["metrics"].get(metric) if res and res["ok"] else None
                rows[cid].append(v if isinstance(v, (int, float)) and math.isfinite(v) else None)
        return rows

    try:
        # 1. selection
        run([("select", cid, vname, seed, params) for vname in variants for cid, params in configs.items()
             for seed in seeds], f"{len(configs)} configs x {len(seeds)} seeds x {len(variants)} variant(s)")
        main = table("select", "main", objective.metric)
        summary = analyse.robust_summary(main, objective.direction, float(r["penalty"]))
        long_metric, long_table, flags = None, {}, {}
        if "long_context" in variants:
            long_metric = "passkey_acc" if variants["long_context"].dataset["kind"] == "passkey" else "val_acc"
            long_table = table("select", "long_context", long_metric)
        elif spec.dataset["kind"] == "passkey":
            long_metric, long_table = "passkey_acc", table("select", "main", "passkey_acc")
        baseline_id = best_of_arm.get("baseline")
        if long_table and baseline_id:
            flags = analyse.long_range_flags(long_table, baseline_id)
        noise_table = table("select", "noise", objective.metric) if "noise" in variants else {}
        eligible = [c for c in summary if summary[c]["score"] is not None and not (r["constraint"] and flags.get(c))]
        winner = eligible[0] if eligible else None
        by_arm = {arm: [c for c in eligible if arm_of_config.get(c) == arm] for arm in spec.arms}
        chosen = {arm: ids[0] for arm, ids in by_arm.items() if ids}
        # 2. confirmation on seeds no choice was made on
        verdict, confirmation = None, None
        if len(spec.arms) > 1 and "ssa" in chosen and "baseline" in chosen:
            pair = [chosen["ssa"], chosen["baseline"]]
            run([("confirm", cid, "main", seed, configs[cid]) for cid in pair for seed in confirm],
                f"best SSA {pair[0]} vs best baseline {pair[1]} x {len(confirm)} new seeds")
            conf = table("confirm", "main", objective.metric, pair, confirm)
            costs = {}
            for metric in COSTS:
                ct = table("confirm", "main", metric, pair, confirm)
                s_vals, b_vals = [v for v in ct[pair[0]] if v is not None], [v for v in ct[pair[1]] if v is not None]
                if s_vals and b_vals:
                    costs[metric] = {"ssa": statistics.fmean(s_vals), "baseline": statistics.fmean(b_vals),
                                     "ssa_std": statistics.stdev(s_vals) if len(s_vals) > 1 else 0.0,
                                     "baseline_std": statistics.stdev(b_vals) if len(b_vals) > 1 else 0.0,
                                     "ratio": statistics.fmean(s_vals) / statistics.fmean(b_vals)
                                     if statistics.fmean(b_vals) else None, "n": [len(s_vals), len(b_vals)]}
            verdict = analyse.verdict(conf[pair[0]], conf[pair[1]], objective.direction, objective.metric, costs)
            verdict["ssa_config"], verdict["baseline_config"] = pair
            verdict["seeds"] = confirm
            confirmation = {"seeds": confirm, "values": conf}
    finally:
        mirror.close(timeout=60.0)

    report = {
        "objective": objective.metric, "direction": objective.direction, "penalty": float(r["penalty"]),
        "seeds": seeds, "eval_seed": eval_seed, "configs": configs, "arms": arm_of_config | {},
        "baseline": baseline_id, "summary": summary,
        "rank_stability_kendall_tau": analyse.rank_stability(main),
        "long_context": {"metric": long_metric, "values": long_table, "flagged": flags,
                         "constraint": bool(r["constraint"])} if long_metric else None,
        "noise": {"metric": objective.metric, "values": noise_table} if noise_table else None,
        "winner": winner, "chosen": chosen, "best_ssa": chosen.get("ssa"), "confirmation": confirmation,
        "verdict": verdict,
    }
    report["arms"] = {c: arm_of_config.get(c) for c in configs}
    study.set_user_attr(ATTR_ROBUSTNESS, json.loads(json.dumps(report, default=str)))
    if winner:
        w = summary[winner]
        fails = f", {w['failed']} failed" if w["failed"] else ""
        out(f"robust winner: {winner} ({objective.metric} {w['mean']:.4f} +- {w['std']:.4f} over {w['seeds']} "
            f"seeds{fails})")
    if verdict:
        out(f"verdict: {verdict['answer']}")
    return report
