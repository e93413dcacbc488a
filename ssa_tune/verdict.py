"""The answer to "is SSA worth it here?": contrasts paired by seed and decided sequentially, the convergence
ratio, and a recommendation that weighs the decision against the user's cost tolerances.

Pure functions over numbers; `robustness.Plan` runs the seeds and calls them after every round.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from . import sequential
from .sequential import EQUIVALENT, HELPS, HURTS, UNDECIDED, Design

# what the recommendation tolerates, as SSA / baseline ratios of each cost (tokens/s: baseline / SSA)
DEFAULT_MAX_COST = {"latency_ms_per_token": 1.10, "peak_mem_mb": 1.25}
COST_NAMES = {"latency_ms_per_token": "decode", "peak_mem_mb": "peak memory", "n_params": "parameters",
              "tokens_per_s": "training throughput"}
HIGHER_IS_BETTER_COSTS = {"tokens_per_s"}
DEFAULT_CONFIRM = {"min": 3, "max": 12, "step": 1}
CONTRASTS = {"deploy": "each arm's robust best (what you would deploy)",
             "ssa_alone": "the baseline's best with the SSA arm's ssa section added, nothing else changed"}


def default_margin(metric: str) -> float | str:
    """1 % of the baseline's value for losses and perplexities, one point (0.01) for accuracies."""
    return 0.01 if metric.endswith("acc") else "1%"


def parse_margin(value: Any) -> tuple[str, float]:
    """("absolute", x) for a number > 0, ("relative", f) for "p%" (0 < p < 100); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number > 0 or a percentage like \"1%\", got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"must be > 0, got {value!r}")
        return "absolute", float(value)
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"must be a number > 0 or a percentage like \"1%\", got {value!r}") from None
        if not 0 < pct < 100:
            raise ValueError(f"a relative margin must be between 0% and 100%, got {value!r}")
        return "relative", pct / 100
    raise ValueError(f"must be a number > 0 or a percentage like \"1%\", got {value!r}")


def margin_value(spec_margin: Any, baseline_values: Sequence[float | None]) -> float | None:
    """The margin in the metric's units: a relative one is a share of the baseline's mean (None: no value)."""
    kind, x = parse_margin(spec_margin)
    if kind == "absolute":
        return x
    ok = [v for v in baseline_values if _ok(v)]
    return x * abs(statistics.fmean(ok)) if ok and statistics.fmean(ok) != 0 else None


def margin_label(spec_margin: Any, value: float | None) -> str:
    """"±1 % of the baseline (0.0071)" or "±0.01"."""
    if value is None:
        return "no margin (no baseline value)"
    kind, x = parse_margin(spec_margin)
    return f"±{100 * x:g} % of the baseline ({value:.3g})" if kind == "relative" else f"±{value:.3g}"


def design(confirm: Any) -> Design:
    """The sequential design of `robustness.confirm_seeds`: an int n (one look after n seed pairs) or
    {min, max, step}."""
    if isinstance(confirm, int) and not isinstance(confirm, bool):
        return Design(min_pairs=confirm, max_pairs=confirm, step=1)
    c = {**DEFAULT_CONFIRM, **(confirm or {})}
    return Design(min_pairs=int(c["min"]), max_pairs=int(c["max"]), step=int(c["step"]))


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------- pairing


def paired_values(a: Sequence[float | None], b: Sequence[float | None], direction: str) -> dict[str, Any]:
    """Per-seed differences a - b, where a run that failed (None, NaN) counts against its arm: it takes the
    worst value any run of either arm reached (as the robustness stage's score does). A seed on which both
    failed carries no comparison and is left out; every failure is counted."""
    finite = [v for v in (*a, *b) if _ok(v)]
    worst = (max(finite) if direction == "minimize" else min(finite)) if finite else None
    diffs: list[float] = []
    failed_a = failed_b = both = 0
    for x, y in zip(a, b):
        ok_x, ok_y = _ok(x), _ok(y)
        failed_a += not ok_x
        failed_b += not ok_y
        if not ok_x and not ok_y:
            both += 1
            continue
        diffs.append((x if ok_x else worst) - (y if ok_y else worst))
    return {"diffs": diffs, "failed": [failed_a, failed_b], "both_failed": both}


# ------------------------------------------------------------------------------------------ contrasts


def contrast(a: Sequence[float | None], b: Sequence[float | None], looks: Sequence[int], direction: str,
             metric: str, margin: float | None, dsg: Design, seconds_per_pair: float | None = None,
             label: str | None = None) -> dict[str, Any]:
    """SSA (`a`) against the baseline (`b`), one value per seed (None: that run failed), decided by the
    sequential design at the looks taken so far (`looks`: how many seeds had run at each)."""
    better = -1 if direction == "minimize" else 1
    diffs_by_look, fails_by_look = [], []
    last = paired_values([], [], direction)  # the pairs at the latest look
    for n in looks:
        last = paired_values(a[:n], b[:n], direction)
        diffs_by_look.append(last["diffs"])
        fails_by_look.append(tuple(last["failed"]))
    if margin is None or not diffs_by_look:
        res = sequential.decide([], 1.0, dsg, better)
    else:
        res = sequential.decide(diffs_by_look, margin, dsg, better, fails_by_look)
    out = {"decision": res["decision"], "metric": metric, "direction": direction, "margin": margin,
           "margin_text": label or ("no margin" if margin is None else f"±{margin:.3g}"),
           "seeds_run": looks[-1] if looks else 0, "looks": list(looks), "decided_at_look": res["look"] or None,
           "failed": {"ssa": last["failed"][0], "baseline": last["failed"][1], "both": last["both_failed"]},
           "withheld": res.get("withheld"), "final": res["final"],
           "ssa_minus_baseline": {
               "diff": res["mean"], "low": res["low"], "high": res["high"], "eq_low": res["eq_low"],
               "eq_high": res["eq_high"], "n": res["n"], "sd": res["sd"], "confidence": 1 - dsg.alpha,
               "eq_confidence": 1 - 2 * dsg.alpha_eq, "beyond_margin": res["beyond_margin"],
               "per_seed": diffs_by_look[-1] if diffs_by_look else [],
               "method": (f"group-sequential paired t, {dsg.alpha:.0%} two-sided and {dsg.alpha_eq:.0%} TOST "
                          f"spent over looks at {dsg.looks()} seed pairs; repeated intervals")}}
    if res["decision"] == UNDECIDED and res["mean"] is not None:
        # what this evidence rules out, and what would decide
        out["rules_out_beyond"] = max(abs(res["low"]), abs(res["high"]))
        total = sequential.pairs_to_decide(res, margin, dsg) if margin else None
        more = None if total is None else max(1, total - res["n"])
        out["more_pairs"] = more
        out["more_seconds"] = None if more is None or seconds_per_pair is None else more * seconds_per_pair
    out["answer"] = answer_line(out)
    return out


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:+.4g}"


def _duration(s: float) -> str:
    return f"~{s / 60:.0f} min" if s >= 90 else f"~{s:.0f} s"


def answer_line(c: dict) -> str:
    """`<decision>: <evidence>` for a contrast."""
    d, metric = c["ssa_minus_baseline"], c["metric"]
    n = d["n"]
    conf = int(round(100 * d["confidence"]))
    fails = c["failed"]
    failed = (f"; failed seeds: SSA {fails['ssa']}, baseline {fails['baseline']}"
              if fails["ssa"] or fails["baseline"] else "")
    if d["diff"] is None:
        return (f"undecided: no seed on which SSA or the baseline finished ({c['seeds_run']} run){failed}"
                if c["seeds_run"] else "undecided: no confirmation seed has run")
    margin = c["margin_text"]
    if c["decision"] in (HELPS, HURTS):
        where = "beyond" if d["beyond_margin"] else "within"
        return (f"{c['decision']}: {metric} SSA − baseline = {_g(d['diff'])} [{_g(d['low'])}, {_g(d['high'])}], "
                f"{conf} % repeated interval over {n} seed pairs, excludes 0; {where} the {margin} margin{failed}")
    if c["decision"] == EQUIVALENT:
        eq = int(round(100 * d["eq_confidence"]))
        return (f"equivalent: {metric} SSA − baseline = {_g(d['diff'])}, {eq} % repeated interval "
                f"[{_g(d['eq_low'])}, {_g(d['eq_high'])}] inside the {margin} margin over {n} seed pairs{failed}")
    text = (f"undecided: {metric} SSA − baseline = {_g(d['diff'])} [{_g(d['low'])}, {_g(d['high'])}] over {n} "
            f"seed pairs")
    if c.get("withheld"):
        text += f" ({c['withheld']})"
    if c.get("rules_out_beyond") is not None:
        text += f"; rules out effects beyond ±{c['rules_out_beyond']:.3g}"
    if c.get("more_pairs"):
        cost = f" ({_duration(c['more_seconds'])})" if c.get("more_seconds") else ""
        text += f"; about {c['more_pairs']} more seed pairs{cost} would decide at {margin}"
    elif not c["final"]:
        text += "; more seeds are running"
    return text + failed


# ----------------------------------------------------------------------------------------- convergence


def tokens_to_reach(history: Sequence[Sequence[float]], target: float, direction: str) -> float | None:
    """Training tokens at which a run's evaluations first reach `target` (linear between evaluations);
    None when they never do. `history`: (tokens, value) per evaluation, in order."""
    reached = (lambda v: v <= target) if direction == "minimize" else (lambda v: v >= target)
    prev = None
    for tokens, value in history:
        if not _ok(value):
            continue
        if reached(value):
            if prev is None or value == prev[1]:
                return float(tokens)
            frac = (target - prev[1]) / (value - prev[1])
            return float(prev[0] + min(max(frac, 0.0), 1.0) * (tokens - prev[0]))
        prev = (tokens, value)
    return None


def convergence(ssa: Sequence[Sequence | None], baseline: Sequence[Sequence | None], direction: str,
                confidence: float = 0.95) -> dict[str, Any]:
    """Per seed: the training tokens each arm needs to reach the baseline's final value, and the paired
    ratio SSA / baseline (geometric mean with a t interval on the log ratios). A seed where SSA never reaches
    it counts at its whole budget (a lower bound on its ratio: `censored`)."""
    from scipy import stats

    per_seed, logs, censored = [], [], 0
    for hs, hb in zip(ssa, baseline):
        if not hs or not hb:
            per_seed.append(None)
            continue
        finals = [v for _, v in hb if _ok(v)]
        if not finals:
            per_seed.append(None)
            continue
        target = finals[-1]
        tb = tokens_to_reach(hb, target, direction)
        ts = tokens_to_reach(hs, target, direction)
        cut = ts is None
        if cut:
            censored += 1
            ts = float(hs[-1][0])
        if not tb or not ts:
            per_seed.append(None)
            continue
        per_seed.append({"ssa_tokens": ts, "baseline_tokens": tb, "ratio": ts / tb, "censored": cut})
        logs.append(math.log(ts / tb))
    out: dict[str, Any] = {"ratio": None, "low": None, "high": None, "n": len(logs), "censored": censored,
                           "per_seed": per_seed, "confidence": confidence,
                           "what": "training tokens SSA needs to reach the baseline's final value ÷ the tokens "
                                   "the baseline needs, per seed, geometric mean"}
    if logs:
        mean = statistics.fmean(logs)
        out["ratio"] = math.exp(mean)
        if len(logs) > 1:
            se = statistics.stdev(logs) / math.sqrt(len(logs))
            half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * se
            out["low"], out["high"] = math.exp(mean - half), math.exp(mean + half)
    return out


def convergence_text(conv: dict, metric: str) -> str | None:
    """The convergence answer in words. A seed where SSA never reached the baseline's final value counts at
    SSA's whole budget, so with such seeds the ratio is only a lower bound ("≥"), and when no seed reached it
    the sentence says that instead of a ratio of ×1."""
    if conv.get("ratio") is None:
        return None
    n, cut = conv["n"], conv.get("censored") or 0
    interval = ("no interval" if conv.get("low") is None else
                f"{int(round(100 * conv['confidence']))} % interval ×{conv['low']:.3g}–×{conv['high']:.3g}")
    if cut >= n:
        return (f"SSA did not reach the baseline's final {metric} within its training budget on any of {n} seed(s) "
                f"(it needs more than ×{conv['ratio']:.3g} the baseline's tokens)")
    if cut:
        return (f"SSA needs at least ×{conv['ratio']:.3g} the baseline's training tokens to reach the baseline's "
                f"final {metric} ({interval} over {n} seeds; on {cut} SSA never reached it and counts at its "
                f"whole budget, so this is a lower bound)")
    return (f"SSA needs ×{conv['ratio']:.3g} the baseline's training tokens to reach the baseline's final {metric} "
            f"({interval} over {n} seeds)")


# -------------------------------------------------------------------------------------- recommendation


def cost_ratio(metric: str, cost: dict) -> float | None:
    """How much more SSA costs than the baseline (> 1: more), whichever way the metric points."""
    s, b = cost.get("ssa"), cost.get("baseline")
    if not _ok(s) or not _ok(b) or s <= 0 or b <= 0:
        return None
    return b / s if metric in HIGHER_IS_BETTER_COSTS else s / b


def recommend(deploy: dict, costs: dict[str, dict], max_cost: dict[str, float]) -> dict[str, Any]:
    """One sentence from the deploy contrast's decision and the costs against the tolerances."""
    ratios = {m: r for m in max_cost if m in costs and (r := cost_ratio(m, costs[m])) is not None}
    over = {m: r for m, r in ratios.items() if r > max_cost[m]}
    shown = [m for m in ("latency_ms_per_token", "peak_mem_mb", "tokens_per_s") if m in ratios] or list(ratios)
    cost_text = ", ".join(f"×{ratios[m]:.2f} {COST_NAMES.get(m, m)}" for m in shown)
    over_text = ", ".join(f"×{r:.2f} {COST_NAMES.get(m, m)} (tolerance ×{max_cost[m]:.2f})" for m, r in over.items())
    d, m_text = deploy["ssa_minus_baseline"], deploy["margin_text"]
    interval = f"{_g(d['diff'])} {deploy['metric']} [{_g(d['low'])}, {_g(d['high'])}]"
    decision = deploy["decision"]
    if decision == HELPS and d["beyond_margin"] and not over:
        action, text = "adopt", f"adopt SSA: {interval}" + (f" at {cost_text}" if cost_text else "")
    elif decision == HELPS and d["beyond_margin"]:
        action, text = "keep", f"keep plain attention: SSA helps ({interval}) but costs {over_text}"
    elif decision == HELPS:
        action = "keep"
        text = (f"keep plain attention: SSA helps by less than the {m_text} margin ({interval})"
                + (f" at {cost_text}" if cost_text else ""))
    elif decision == HURTS:
        action, text = "keep", f"keep plain attention: SSA hurts ({interval})" + (f" at {cost_text}" if cost_text else "")
    elif decision == EQUIVALENT:
        action = "keep"
        text = f"keep plain attention: equivalent within {m_text}" + (f" at {cost_text}" if cost_text else "")
    else:
        action = "undecided"
        more = deploy.get("more_pairs")
        if more:
            cost = f" ({_duration(deploy['more_seconds'])})" if deploy.get("more_seconds") else ""
            text = f"undecided: about {more} more seed pairs{cost} would decide at {m_text}"
        else:
            text = "undecided: " + deploy["answer"].split(": ", 1)[-1]
    return {"action": action, "text": text, "cost_ratios": ratios, "over_tolerance": over, "max_cost": max_cost}
