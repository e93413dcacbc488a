"""Per-dataset answers from a finished study: importances with intervals, robustness, the SSA verdict.

Pure functions over trials and numbers (Optuna's importance evaluators and SciPy's statistics); running the
extra trainings is `robustness.Plan` (run by the tuner on its workers), drawing is `report`.
"""

from __future__ import annotations

import math
import os
import statistics
from itertools import combinations
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .spec import SSA_SWITCH

EVALUATORS = ("fanova", "ped_anova")


# ------------------------------------------------------------------------------------------ importances


def _evaluator(kind: str, seed: int):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if kind == "fanova":
        # 16 trees a forest (Optuna's default is 64): the interval comes from the 200 resamples, and each
        # resample refits the forest with its own seed
        return FanovaImportanceEvaluator(n_trees=16, seed=seed)
    return PedAnovaImportanceEvaluator()


def _groups(trials: list[FrozenTrial]) -> list[tuple[str, list[FrozenTrial]]]:
    """Importances need every trial to carry the same params; with the conditional ssa.* params that means
    two groups: all trials (the params every trial has) and the SSA trials (their ssa.* knobs too)."""
    groups = [("all trials", trials)]
    ssa = [t for t in trials if t.params.get(SSA_SWITCH) is True]
    if any(SSA_SWITCH in t.params for t in trials) and len(ssa) < len(trials):
        groups.append(("SSA trials", ssa))
    return groups


def _varying_common_params(trials: list[FrozenTrial]) -> list[str]:
    common = set.intersection(*(set(t.params) for t in trials)) if trials else set()
    return sorted(p for p in common if len({repr(t.params[p]) for t in trials}) > 1)


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # PED-ANOVA's reminder that it looks for low targets; `target` is already signed for the direction
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes the importances")


REPEATS = 200  # bootstrap resamples behind every importance interval
RESAMPLES_ENV = "SSA_TUNE_IMPORTANCE_RESAMPLES"  # the setting that changes it (e.g. fewer in tests)


def resamples() -> int:
    """The report's bootstrap resamples: $SSA_TUNE_IMPORTANCE_RESAMPLES, else 200. At least 20: with fewer, a
    90 % interval is the min and max of a handful of fits."""
    raw = os.environ.get(RESAMPLES_ENV, "").strip()
    if not raw:
        return REPEATS
    try:
        n = int(raw)
    except ValueError:
        n = None
    if n is None or n < 20:
        raise UserError(f"must be an integer >= 20 (bootstrap resamples of the report's importances), got {raw!r}",
                        field=RESAMPLES_ENV)
    return n


def importances(study: optuna.Study, objective: int = 0, repeats: int = REPEATS, seed: int = 0,
                evaluators: Sequence[str] = EVALUATORS, min_trials: int = 4) -> dict[str, dict[str, dict]]:
    """{evaluator -> {param -> {mean, low, high, group, n_trials, repeats}}}: each evaluator repeated on
    `repeats` bootstrap resamples of the complete trials (fANOVA also with a fresh forest seed); low and
    high are the 5th and 95th percentiles, a 90 % bootstrap interval (with few resamples they would be
    little more than the min and max, hence 200)."""
    _quiet()
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values is not None and math.isfinite(t.values[objective])]
    sign = -1.0 if study.directions[objective] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict]] = {e: {} for e in evaluators}
    for group, members in _groups(trials):
        params = _varying_common_params(members)
        if len(members) < min_trials or not params:
            continue
        samples: dict[str, dict[str, list[float]]] = {e: {p: [] for p in params} for e in evaluators}
        for r in range(repeats):
            idx = rng.integers(0, len(members), len(members))
            resampled = [members[i] for i in idx]
            if not _varying_common_params(resampled):
                continue
            tmp = optuna.create_study(directions=["minimize"] * len(study.directions))
            tmp.add_trials(resampled)
            for e in evaluators:
                try:
                    imp = optuna.importance.get_param_importances(
                        tmp, evaluator=_evaluator(e, seed + r), params=params,
                        target=lambda t, i=objective: sign * t.values[i])
                except (RuntimeError, ValueError, ZeroDivisionError):
                    continue  # e.g. a resample where every value is equal
                for p in params:
                    v = imp.get(p, 0.0)
                    samples[e][p].append(float(v) if math.isfinite(v) else 0.0)
        for e in evaluators:
            for p, vals in samples[e].items():
                if not vals or p in out[e]:  # a param of both groups keeps the all-trials estimate
                    continue
                out[e][p] = {"mean": float(np.mean(vals)), "low": float(np.percentile(vals, 5)),
                             "high": float(np.percentile(vals, 95)), "group": group, "n_trials": len(members),
                             "repeats": len(vals)}
    for e in evaluators:
        out[e] = dict(sorted(out[e].items(), key=lambda kv: -kv[1]["mean"]))
    return out


def top_pairs(imp: dict[str, dict], k: int = 2) -> list[tuple[str, str]]:
    """The most important parameter pairs (by the product of their mean importances), for contour plots."""
    names = list(imp)[:4]
    pairs = sorted(combinations(names, 2), key=lambda ab: -imp[ab[0]]["mean"] * imp[ab[1]]["mean"])
    return pairs[:k]


# ------------------------------------------------------------------------------------------ robustness


def robust_summary(results: dict[str, list[float]], direction: str, penalty: float = 1.0) -> dict[str, dict]:
    """Per config: mean, std over seeds and the robust score mean - penalty*std (as a loss: mean + penalty*std
    when minimising), ranked best first.

    A seed that failed counts, as the worst value any configuration reached on any seed: a configuration
    whose seeds fail is penalised, never rewarded by a std over the survivors. All seeds failed: no score."""
    sign = 1.0 if direction == "minimize" else -1.0
    finite = [v for vals in results.values() for v in vals if v is not None and math.isfinite(v)]
    worst = (max(finite) if sign > 0 else min(finite)) if finite else None
    rows = {}
    for cid, values in results.items():
        ok = [v for v in values if v is not None and math.isfinite(v)]
        failed = len(values) - len(ok)
        if not ok:
            rows[cid] = {"mean": None, "std": None, "seeds": len(values), "failed": failed, "values": list(values),
                         "score": None}
            continue
        vals = ok + [worst] * failed
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        score = mean + penalty * std if sign > 0 else mean - penalty * std
        rows[cid] = {"mean": mean, "std": std, "seeds": len(values), "failed": failed, "values": list(values),
                     "score": score}
    ranked = sorted(rows, key=lambda c: (rows[c]["score"] is None, sign * (rows[c]["score"] or 0.0)))
    for rank, cid in enumerate(ranked, 1):
        rows[cid]["rank"] = rank
    return {cid: rows[cid] for cid in ranked}


def rank_stability(results: dict[str, list[float]]) -> float | None:
    """Mean Kendall tau between the config rankings of every pair of seeds (1 = the same order every seed)."""
    from scipy.stats import kendalltau

    ids = [c for c, v in results.items() if v and all(x is not None and math.isfinite(x) for x in v)]
    if len(ids) < 2:
        return None
    n_seeds = min(len(results[c]) for c in ids)
    taus = []
    for a, b in combinations(range(n_seeds), 2):
        tau = kendalltau([results[c][a] for c in ids], [results[c][b] for c in ids]).statistic
        if tau is not None and math.isfinite(tau):
            taus.append(float(tau))
    return statistics.fmean(taus) if taus else None


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], confidence: float = 0.95,
                      direction: str = "minimize") -> dict[str, Any]:
    """mean(a_i - b_i) over the seeds, with a fixed-n paired t interval (the sequential decision is
    `ssa_tune.verdict`; this is for benchmarks that run a fixed number of seeds).

    a[i] and b[i] are runs with the same seed (same batches, same initialisation of the shared weights, the
    same evaluation data), so their difference cancels what the seed does to both; the interval is over
    those per-seed differences (n - 1 degrees of freedom). A run that failed counts against its side, at the
    worst value any run reached (`verdict.paired_values`); `failed` says how many on each side."""
    from scipy import stats

    from .verdict import paired_values

    p = paired_values(a, b, direction)
    diffs = p["diffs"]
    out: dict[str, Any] = {"diff": None, "low": None, "high": None, "n": len(diffs), "confidence": confidence,
                           "method": f"paired t over {len(diffs)} shared seeds", "per_seed": diffs,
                           "failed": p["failed"]}
    if not diffs:
        return out
    out["diff"] = statistics.fmean(diffs)
    if len(diffs) < 2:  # no spread to estimate: no interval, no claim
        return out
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = 0.0 if se == 0 else stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * se
    out["low"], out["high"] = out["diff"] - half, out["diff"] + half
    return out


def guard_reference(long: dict[str, list[float | None]], baseline_id: str) -> list[float | None] | None:
    """The baseline's long-context probe values the guard compares with, or None when none of its probe runs
    finished (then the guard has no reference and checks nothing)."""
    base = long.get(baseline_id) or []
    return base if any(v is not None for v in base) else None


def long_range_flags(long: dict[str, list[float | None]], baseline_id: str, tolerance: float = 0.0) -> dict[str, bool]:
    """True for a config whose mean long-context accuracy falls below the baseline's (minus tolerance).

    A probe run that failed counts as accuracy 0 (it retrieved nothing), for the baseline as for the others;
    when no baseline probe finished there is no reference and nothing is flagged."""
    def mean(values):
        return statistics.fmean(v if v is not None and math.isfinite(v) else 0.0 for v in values)

    base = guard_reference(long, baseline_id)
    if base is None:
        return {}
    ref = mean(base) - tolerance
    return {cid: mean(v) < ref for cid, v in long.items() if cid != baseline_id and v}

