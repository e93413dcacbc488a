"""Sequential confirmation: helps / hurts / equivalent / undecided from seeds paired by seed, in rounds.

The confirmation trains both configurations on seed after seed and looks at the paired differences after
each round; it stops at the first look that decides. Re-running a fixed-n t test after every round would
inflate its error rates (each look is another chance of a false claim), so the looks follow a
group-sequential design with alpha spending (Lan & DeMets 1983; Jennison & Turnbull 2000, ch. 7 and 19):

- *difference* (helps / hurts): a two-sided test of "no difference" whose type-I error `alpha` is spent
  over the looks by a Hwang-Shih-DeCani function with parameter `gamma` (0 = Pocock-like even spending,
  -4 = O'Brien-Fleming-like, almost all of it at the last look);
- *equivalence*: two one-sided tests (TOST) of "the difference is at least the margin", each with its own
  spending of `alpha_eq`; equivalent when both reject at the same look (intersection-union, so the error of a
  false "equivalent" is at most `alpha_eq`).

Either test may stop the confirmation; the other's boundaries are not changed by that (non-binding), which
only lowers its error. Boundaries are computed on the z scale for the information fractions actually seen
(n pairs so far / the most pairs), by numerical integration of the sequence of partial sums, and turned into
Student t boundaries with n - 1 degrees of freedom at the same nominal tail probability (the usual treatment
of an estimated variance). `tests/test_sequential.py` checks the error rates by simulation with this code.

At a look the intervals shown are repeated confidence intervals: mean difference +- boundary x standard error,
valid whenever the confirmation stops.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np

HELPS, HURTS, EQUIVALENT, UNDECIDED = "helps", "hurts", "equivalent", "undecided"
DECISIONS = (HELPS, HURTS, EQUIVALENT, UNDECIDED)


@dataclass(frozen=True)
class Design:
    """The confirmation's rounds and error rates: looks after `min_pairs`, then every `step` pairs, up to
    `max_pairs`; `alpha`: P(helps or hurts | no difference); `alpha_eq`: P(equivalent | |difference| = margin)."""

    min_pairs: int = 3
    max_pairs: int = 12
    step: int = 3
    alpha: float = 0.05
    alpha_eq: float = 0.05
    gamma: float = -2.0
    gamma_eq: float = -2.0

    def __post_init__(self):
        if not 2 <= self.min_pairs <= self.max_pairs:
            raise ValueError(f"confirm_seeds: need 2 <= min <= max, got min {self.min_pairs}, max {self.max_pairs}")
        if self.step < 1:
            raise ValueError(f"confirm_seeds.step: must be >= 1, got {self.step}")

    def looks(self) -> list[int]:
        """The numbers of seed pairs after which the confirmation looks (the planned rounds)."""
        out = list(range(self.min_pairs, self.max_pairs, self.step))
        return out + [self.max_pairs]

    def next_look(self, n: int) -> int | None:
        """The planned look after `n` pairs have been run (None: `n` is already the last)."""
        return next((k for k in self.looks() if k > n), None)


def spent(alpha: float, gamma: float, t: float) -> float:
    """Hwang-Shih-DeCani spending: the error spent by information fraction t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    if abs(gamma) < 1e-12:
        return alpha * t
    return alpha * (1.0 - math.exp(-gamma * t)) / (1.0 - math.exp(-gamma))


# ------------------------------------------------------------------------------ group-sequential boundaries

_GRID = 801  # points across each look's continuation region


def _norm_cdf(x):
    from scipy.special import ndtr

    return ndtr(x)


def _norm_isf(p: float) -> float:
    from scipy.special import ndtri

    return float(-ndtri(p))


@functools.lru_cache(maxsize=4096)
def z_bounds(fractions: tuple[float, ...], alpha: float, gamma: float, two_sided: bool) -> tuple[float, ...]:
    """z boundaries c_k for looks at information `fractions` (increasing, in (0, 1]): under the null the
    probability of first crossing at look k (|Z| >= c_k two-sided, Z >= c_k one-sided) is the error spent
    between the fractions of looks k-1 and k. Computed by recursive numerical integration of the partial sums
    S_k = Z_k sqrt(t_k), whose increments are independent N(0, t_k - t_(k-1))."""
    from scipy.optimize import brentq

    bounds: list[float] = []
    grid = weights = dens = None  # density of S on the continuation region of the previous look
    prev_t, prev_spent = 0.0, 0.0
    for t in fractions:
        target = spent(alpha, gamma, t) - prev_spent
        prev_spent += max(target, 0.0)
        if dens is None:  # the first look: a plain normal quantile
            c = math.inf if target <= 0 else _norm_isf(target / 2 if two_sided else target)
        else:
            sd = math.sqrt(t - prev_t)

            def crossing(c, sd=sd, t=t):
                hi = 1.0 - _norm_cdf((c * math.sqrt(t) - grid) / sd)
                lo = _norm_cdf((-c * math.sqrt(t) - grid) / sd) if two_sided else 0.0
                return float(np.sum(weights * dens * (hi + lo)))

            if target <= 1e-15:
                c = math.inf
            elif crossing(0.0) <= target:  # even a zero boundary spends less: cross with any statistic
                c = 0.0
            else:
                c = brentq(lambda x: crossing(x) - target, 0.0, 40.0, xtol=1e-10)
        bounds.append(c)
        # the density of S_k on its continuation region
        top = min(c, 12.0) * math.sqrt(t)
        bottom = -top if two_sided else -12.0 * math.sqrt(t)
        new_grid = np.linspace(bottom, top, _GRID)
        new_w = np.full(_GRID, (top - bottom) / (_GRID - 1))
        new_w[0] = new_w[-1] = new_w[0] / 2
        if dens is None:
            new_dens = np.exp(-new_grid ** 2 / (2 * t)) / math.sqrt(2 * math.pi * t)
        else:
            sd = math.sqrt(t - prev_t)
            kernel = np.exp(-((new_grid[:, None] - grid[None, :]) / sd) ** 2 / 2) / (sd * math.sqrt(2 * math.pi))
            new_dens = kernel @ (weights * dens)
        grid, weights, dens, prev_t = new_grid, new_w, new_dens, t
    return tuple(bounds)


@functools.lru_cache(maxsize=4096)
def t_bounds(looks: tuple[int, ...], max_pairs: int, alpha: float, gamma: float,
             two_sided: bool) -> tuple[float, ...]:
    """The z boundaries as Student t boundaries with n - 1 degrees of freedom (same nominal tail)."""
    from scipy.stats import t as student

    fractions = tuple(min(1.0, n / max_pairs) for n in looks)
    out = []
    for n, c in zip(looks, z_bounds(fractions, alpha, gamma, two_sided)):
        tail = 0.5 * math.erfc(c / math.sqrt(2)) if math.isfinite(c) else 0.0
        out.append(math.inf if tail <= 0 else float(student.isf(tail, n - 1)))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ decide


def decide(diffs_by_look: Sequence[Sequence[float]], margin: float, design: Design, better: int = -1,
           failed_by_look: Sequence[tuple[int, int]] | None = None) -> dict:
    """The decision after the looks so far.

    `diffs_by_look[k]` is the list of paired differences (SSA - baseline) available at look k (each look's list
    extends the previous one); `margin` > 0 in the metric's units; `better` is -1 when lower is better (a loss),
    +1 when higher is. Returns {decision, look, n, mean, sd, se, low, high (repeated 1 - alpha interval),
    eq_low, eq_high (repeated 1 - 2 alpha_eq interval), bound, eq_bound, beyond_margin, final}; the decision
    is that of the first look that decided (later looks never change it), else undecided.

    `failed_by_look[k]` = (seeds SSA failed, seeds the baseline failed) at look k: a decision that favours the
    side that failed more often (helps: SSA; hurts: the baseline; equivalent: neither, so any imbalance) is
    withheld at that look (`withheld` says why), whatever its interval says, and so is a decision of an
    earlier look that the failures of the last look no longer allow (withholding only ever makes fewer claims,
    so the error rates hold)."""
    looks: list[int] = []
    lists: list[Sequence[float]] = []
    fails: list[tuple[int, int]] = []
    for k, diffs in enumerate(diffs_by_look):  # a look that added no pair adds no information: not a look
        if len(diffs) >= 2 and (not looks or len(diffs) > looks[-1]):
            looks.append(len(diffs))
            lists.append(diffs)
            fails.append(tuple(failed_by_look[k]) if failed_by_look else (0, 0))
    if not looks:
        n = len(diffs_by_look[-1]) if diffs_by_look else 0
        return {"decision": UNDECIDED, "look": 0, "n": n, "withheld": None, "mean": None, "sd": None, "se": None, "low": None,
                "high": None, "eq_low": None, "eq_high": None, "bound": None, "eq_bound": None,
                "beyond_margin": None, "final": n >= design.max_pairs}
    key = tuple(min(n, design.max_pairs) for n in looks)
    b = t_bounds(key, design.max_pairs, design.alpha, design.gamma, True)
    e = t_bounds(key, design.max_pairs, design.alpha_eq, design.gamma_eq, False)
    out: dict = {}
    for k, diffs in enumerate(lists):
        out = _look(diffs, margin, b[k], e[k], better)
        out["look"] = k + 1
        out["withheld"] = _withheld(out["decision"], *fails[k])
        if out["withheld"]:
            out["decision"] = UNDECIDED
        if out["decision"] != UNDECIDED:
            break
    if out["decision"] != UNDECIDED and (late := _withheld(out["decision"], *fails[-1])):
        # seeds run after the deciding look (the other contrast went on) failed: the claim is not upheld
        out["decision"], out["withheld"] = UNDECIDED, late
    out["final"] = out["decision"] != UNDECIDED or looks[-1] >= design.max_pairs
    return out


def _withheld(decision: str, failed_ssa: int, failed_baseline: int) -> str | None:
    if decision == HELPS and failed_ssa > failed_baseline:
        return f"SSA would be called better, but it failed on {failed_ssa} seed(s), the baseline on {failed_baseline}"
    if decision == HURTS and failed_baseline > failed_ssa:
        return (f"the baseline would be called better, but it failed on {failed_baseline} seed(s), SSA on "
                f"{failed_ssa}")
    if decision == EQUIVALENT and failed_ssa != failed_baseline:
        return f"equivalent in value, but SSA failed on {failed_ssa} seed(s) and the baseline on {failed_baseline}"
    return None


def _look(diffs: Sequence[float], margin: float, bound: float, eq_bound: float, better: int) -> dict:
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half, eq_half = bound * se, eq_bound * se
    if se == 0:  # every seed gave the same difference: nothing random left to doubt
        half = eq_half = 0.0
    low, high = mean - half, mean + half
    eq_low, eq_high = mean - eq_half, mean + eq_half
    if low > 0 or high < 0:
        decision = HELPS if mean * better > 0 else HURTS
    elif -margin < eq_low and eq_high < margin:
        decision = EQUIVALENT
    else:
        decision = UNDECIDED
    return {"decision": decision, "n": n, "mean": mean, "sd": sd, "se": se, "low": low, "high": high,
            "eq_low": eq_low, "eq_high": eq_high, "bound": bound, "eq_bound": eq_bound,
            "beyond_margin": abs(mean) > margin}


def pairs_to_decide(result: dict, margin: float, design: Design) -> int | None:
    """About how many seed pairs in all would decide at the margin, were the mean and spread what they are
    now: the fewest n at which the last look's boundaries would exclude 0 or fit inside +-margin."""
    mean, sd = result.get("mean"), result.get("sd")
    if mean is None or sd is None or sd == 0:
        return None
    fractions = tuple(n / design.max_pairs for n in design.looks())
    zb = z_bounds(fractions, design.alpha, design.gamma, True)[-1]
    ze = z_bounds(fractions, design.alpha_eq, design.gamma_eq, False)[-1]
    needs = []
    if abs(mean) < margin:
        needs.append((ze * sd / (margin - abs(mean))) ** 2)
    if mean != 0:
        needs.append((zb * sd / abs(mean)) ** 2)
    return max(result["n"] + 1, math.ceil(min(needs))) if needs else None
