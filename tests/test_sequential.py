"""Decisive answers: the sequential confirmation's error rates by simulation with the real decision code, the
failed-seed rule, margins, the rounds of the robustness plan, and each decision's line and JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest

from ssa_tune import sequential, verdict as vd
from ssa_tune.sequential import Design

N_STUDIES = 2000
DESIGN = vd.design({"min": 3, "max": 12, "step": 1})  # the default confirm_seeds


def simulate(delta: float, noise: str, design: Design = DESIGN, n: int = N_STUDIES, seed: int = 0,
             margin: float = 1.0) -> tuple[dict[str, float], float]:
    """Simulated confirmations of a loss (lower is better): per-seed differences SSA - baseline = delta +
    noise with standard deviation `margin`, run through `verdict.contrast` look after look as the robustness
    plan does (it stops at the first decided look). Returns the share of each decision and the mean number
    of seed pairs used."""
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(sequential.DECISIONS, 0)
    used = []
    for _ in range(n):
        x = rng.standard_normal(design.max_pairs) if noise == "gauss" else \
            rng.standard_t(3, design.max_pairs) / math.sqrt(3)  # t(3) scaled to unit variance
        diffs = delta + margin * x
        base = [1.0] * design.max_pairs
        ssa = list(1.0 + diffs)
        # every planned look at once: the decision is the first look's that decides, which is where the
        # plan stops (test_the_plan_stops_at_the_round_that_decides runs the rounds one by one)
        looks = design.looks()
        c = vd.contrast(ssa, base, looks, "minimize", "val_loss", margin, design)
        counts[c["decision"]] += 1
        used.append(looks[c["decided_at_look"] - 1] if c["decision"] != "undecided" else design.max_pairs)
    return {k: v / n for k, v in counts.items()}, float(np.mean(used))


@pytest.mark.parametrize("noise", ["gauss", "t3"])
def test_no_difference_is_called_equivalent_and_rarely_a_difference(noise):
    rates, pairs = simulate(0.0, noise)
    print(f"\ntrue difference 0, {noise}: {rates}, mean seed pairs {pairs:.2f} of {DESIGN.max_pairs}")
    assert rates["helps"] + rates["hurts"] <= 0.05
    assert rates["equivalent"] >= 0.80


@pytest.mark.parametrize("noise", ["gauss", "t3"])
@pytest.mark.parametrize("sign", [1, -1])
def test_twice_the_margin_is_found_the_right_way(noise, sign):
    rates, pairs = simulate(2.0 * sign, noise, seed=1)
    right, wrong = ("hurts", "helps") if sign > 0 else ("helps", "hurts")  # + on a loss: SSA is worse
    print(f"\ntrue difference {2 * sign} x margin, {noise}: {rates}, mean seed pairs {pairs:.2f} of "
          f"{DESIGN.max_pairs}")
    assert rates[right] >= 0.80
    assert rates[wrong] <= 0.01
    assert pairs <= DESIGN.max_pairs / 2  # a clear answer stops early


@pytest.mark.parametrize("noise", ["gauss", "t3"])
def test_a_difference_at_the_margin_is_rarely_called_equivalent(noise):
    """The TOST's own error: with the true difference exactly at the margin, 'equivalent' <= alpha_eq."""
    rates, _ = simulate(1.0, noise, seed=2)
    assert rates["equivalent"] <= DESIGN.alpha_eq


def test_repeated_t_tests_would_not_hold_the_error_rate():
    """What the spending is for: a fixed-n 95 % t test after every round calls a difference far more often
    than 5 % when there is none (the design's own rate is the first test's)."""
    from scipy import stats

    rng = np.random.default_rng(5)
    d = rng.standard_normal((N_STUDIES, 12))
    called = np.zeros(N_STUDIES, dtype=bool)
    for k in DESIGN.looks():
        x = d[:, :k]
        t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(k))
        called |= np.abs(t) >= stats.t.isf(0.025, k - 1)
    assert called.mean() > 0.10


def test_boundaries_spend_alpha_exactly():
    """The z boundaries' crossing probabilities, checked by Monte Carlo of Brownian motion at the looks."""
    looks = DESIGN.looks()
    fr = tuple(k / 12 for k in looks)
    c = sequential.z_bounds(fr, 0.05, -2.0, True)
    rng = np.random.default_rng(0)
    inc = rng.standard_normal((200_000, len(fr))) * np.sqrt(np.diff((0.0, *fr)))
    z = np.cumsum(inc, axis=1) / np.sqrt(fr)
    crossed = (np.abs(z) >= np.array(c)).any(axis=1).mean()
    assert crossed == pytest.approx(0.05, abs=0.003)
    t = sequential.t_bounds(tuple(looks), 12, 0.05, -2.0, True)
    assert all(a > b for a, b in zip(t, t[1:]))  # early looks (fewer seeds, fewer degrees of freedom) ask for more
    assert c[-1] < c[0] and c[-1] > 1.96  # the last look pays a little for the earlier ones


# ------------------------------------------------------------------------------------------ failed seeds


def test_a_failed_ssa_seed_counts_against_ssa_and_is_never_helps():
    base = [0.80, 0.81, 0.79, 0.80, 0.82, 0.80]
    ssa = [0.70, 0.71, None, 0.70, 0.72, 0.70]  # clearly better wherever it finished, but one seed diverged
    c = vd.contrast(ssa, base, [3, 6], "minimize", "val_loss", 0.01, vd.design({"min": 3, "max": 6}))
    assert c["decision"] != "helps"
    assert c["failed"] == {"ssa": 1, "baseline": 0, "both": 0}
    assert "failed seeds: SSA 1, baseline 0" in c["answer"]
    # the failed seed is in the pairs, at the worst value any run reached (not dropped)
    assert c["ssa_minus_baseline"]["n"] == 6 and max(c["ssa_minus_baseline"]["per_seed"]) == pytest.approx(0.82 - 0.79)
    # the same seeds with SSA finishing everywhere: helps
    ok = vd.contrast([0.70, 0.71, 0.69, 0.70, 0.72, 0.70], base, [3, 6], "minimize", "val_loss", 0.01,
                     vd.design({"min": 3, "max": 6}))
    assert ok["decision"] == "helps"


def test_failed_seeds_never_turn_into_helps_by_simulation():
    """Whatever the values, a contrast where SSA failed on more seeds than the baseline never says helps."""
    rng = np.random.default_rng(3)
    dsg = vd.design({"min": 3, "max": 8, "step": 1})
    for _ in range(300):
        base = list(1.0 + 0.01 * rng.standard_normal(8))
        ssa = list(0.9 + 0.01 * rng.standard_normal(8))
        for i in rng.choice(8, size=int(rng.integers(1, 3)), replace=False):
            ssa[i] = None
        c = vd.contrast(ssa, base, dsg.looks(), "minimize", "val_loss", 0.01, dsg)
        assert c["decision"] != "helps"


def test_paired_values_keep_failures():
    p = vd.paired_values([1.0, None, 2.0, None], [0.5, 1.0, None, None], "minimize")
    assert p["failed"] == [2, 2] and p["both_failed"] == 1
    assert p["diffs"] == [0.5, 2.0 - 1.0, 2.0 - 2.0]  # worst value seen = 2.0
    acc = vd.paired_values([0.9, None], [0.8, 0.7], "maximize")
    assert acc["diffs"] == pytest.approx([0.1, 0.7 - 0.7])  # a failed accuracy run scores the lowest seen


# ------------------------------------------------------------------------------------------------ margins


def test_margin_parsing():
    assert vd.parse_margin(0.005) == ("absolute", 0.005)
    assert vd.parse_margin("1%") == ("relative", 0.01)
    assert vd.parse_margin(" 2.5 % ".strip()) == ("relative", 0.025)
    assert vd.margin_value("1%", [0.70, 0.72, None]) == pytest.approx(0.0071)
    assert vd.margin_value(0.02, []) == 0.02
    for bad in (0, -1, "0%", "150%", "abc%", "1", True, [1], float("nan")):
        with pytest.raises(ValueError):
            vd.parse_margin(bad)
    assert vd.default_margin("val_loss") == "1%" and vd.default_margin("passkey_acc") == 0.01


def test_margin_and_rounds_in_the_spec(write_spec):
    from ssa_tune.spec import load_spec

    spec = load_spec(write_spec({"verdict": {"margin": "2%", "max_cost": {"tokens_per_s": 1.2}},
                                 "robustness": {"confirm_seeds": {"min": 4, "max": 8, "step": 2}}}))
    assert spec.verdict == {"margin": "2%", "max_cost": {"tokens_per_s": 1.2}}
    assert vd.design(spec.robustness["confirm_seeds"]).looks() == [4, 6, 8]
    default = load_spec(write_spec({"robustness": {"seeds": 2}}))
    assert default.verdict["max_cost"] == vd.DEFAULT_MAX_COST and default.verdict["margin"] is None
    assert vd.design(default.robustness["confirm_seeds"]).looks() == list(range(3, 13))
    assert vd.design(default.robustness["confirm_seeds"] | {"step": 4}).looks() == [3, 7, 11, 12]
    assert vd.design(5).looks() == [5]  # a number: one look (a fixed-n test)


# --------------------------------------------------------------------------------- the plan's rounds


def _study_and_spec(write_spec, **robustness):
    from ssa_tune import study as st
    from ssa_tune.spec import load_spec

    spec = load_spec(write_spec({"robustness": {"top_k": 1, "seeds": 2, **robustness},
                                 "verdict": {"margin": 0.01}}))
    study = optuna.create_study(study_name="plan", direction="minimize")
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-3}, distributions=dist, value=1.0,
                                              user_attrs={st.T_ARM: "baseline"}))
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 3e-3}, distributions=dist, value=0.9,
                                              user_attrs={st.T_ARM: "ssa"}))
    return study, spec


def _drive(plan, value) -> list[dict]:
    """Run the plan as the searcher does, scoring every run with `value(job)`; returns the jobs run."""
    jobs = []
    while True:
        job = plan.next_job()
        if not isinstance(job, dict):
            assert job == "finished"
            return jobs
        jobs.append(job)
        v = value(job)
        plan.record(job, {"ok": v is not None, "metrics": {"val_loss": v, "seconds": 2.0},
                          "history": [(100.0, v + 0.2), (200.0, v)] if v is not None else [],
                          "reason": None if v is not None else "diverged"})


def test_the_plan_stops_at_the_round_that_decides(write_spec):
    """SSA alone equal to the baseline within the margin from the start, the deploy pair clearly apart only
    once 5 seed pairs are in: the plan runs rounds of 1 seed after the first 3 and stops at 5."""
    from ssa_tune.robustness import Plan

    study, spec = _study_and_spec(write_spec, confirm_seeds={"min": 3, "max": 12, "step": 1})
    noise = {20001: 0.01, 20002: -0.01}

    def value(job):
        if job["stage"] == "select":
            return 1.0 if job["arm"] == "baseline" else 0.9
        s = job["seed"]
        if job["config"] == "trial-1":  # the SSA arm's own best: 0.02 better, a noisy start
            return 1.0 - 0.02 + noise.get(s, 0.0) + 0.0001 * (s % 2)
        if job["config"].endswith("+ssa"):  # the baseline's recipe with SSA: the same to 1e-4
            return 1.0 + 0.0001 * ((s % 3) - 1)
        return 1.0

    lines = []
    plan = Plan(study, spec, out=lines.append)
    jobs = _drive(plan, value)
    confirm = [j for j in jobs if j["stage"] == "confirm"]
    assert sorted({j["seed"] for j in confirm}) == [20000, 20001, 20002, 20003, 20004]
    assert {j["config"] for j in confirm} == {"trial-0", "trial-1", "trial-0+ssa"}
    assert len(confirm) == 15
    # the SSA-alone configuration: the baseline's lr with the SSA section on, nothing else changed
    alone = next(j for j in confirm if j["config"] == "trial-0+ssa")["params"]
    assert alone["train.lr"] == 1e-3 and alone["ssa.enabled"] is True
    rep = plan.finish()
    v = rep["verdict"]
    assert v["decision"] == "helps" and v["looks"] == [3, 4, 5]
    assert v["contrasts"]["ssa_alone"]["decision"] == "equivalent"
    assert v["contrasts"]["ssa_alone"]["decided_at_look"] == 1 and v["contrasts"]["deploy"]["decided_at_look"] == 3
    assert v["recommendation"]["action"] == "adopt"
    assert any(line.startswith("verdict: helps:") for line in lines)
    assert any(line.startswith("recommendation: adopt SSA") for line in lines)
    json.dumps(rep)  # what the study stores


def test_the_plan_runs_to_max_and_says_what_would_decide(write_spec):
    from ssa_tune.robustness import Plan

    study, spec = _study_and_spec(write_spec, confirm_seeds={"min": 3, "max": 4, "step": 1})
    rng = np.random.default_rng(0)
    plan = Plan(study, spec, out=lambda m: None)
    _drive(plan, lambda job: 1.0 + (0.0 if job["arm"] == "baseline" else 0.02 * rng.standard_normal()))
    v = plan.finish()["verdict"]
    assert v["decision"] == "undecided" and v["seeds"] == [20000, 20001, 20002, 20003]
    d = v["contrasts"]["deploy"]
    assert d["more_pairs"] >= 1 and d["more_seconds"] > 0 and d["rules_out_beyond"] > 0
    assert "more seed pairs" in d["answer"] and "rules out effects beyond" in d["answer"]
    assert v["recommendation"]["text"].startswith("undecided: about")


def test_a_guard_without_its_baseline_probe_says_it_checked_nothing(write_spec):
    """Every long-context probe of the baseline failed: the guard has no reference, flags nothing, and says so
    in the closing lines and the stored record (it once passed silently, as if every configuration were fine)."""
    from ssa_tune.robustness import Plan

    study, spec = _study_and_spec(write_spec, long_context={"kind": "passkey", "seq_len": 64}, confirm_seeds=3)
    lines = []
    plan = Plan(study, spec, out=lines.append)
    while True:
        job = plan.next_job()
        if not isinstance(job, dict):
            break
        dead = job["variant"] == "long_context" and job["arm"] == "baseline"
        plan.record(job, {"ok": not dead, "reason": "diverged" if dead else None,
                          "metrics": {} if dead else {"val_loss": 1.0, "passkey_acc": 0.5, "seconds": 2.0},
                          "history": [] if dead else [(100.0, 1.2), (200.0, 1.0)]})
    lc = plan.finish()["long_context"]
    assert lc["flagged"] == {} and lc["unchecked"].startswith("not checked: the baseline's long-context probe "
                                                              "finished on none of its 2 seed(s)")
    assert f"long-range guard: {lc['unchecked']}" in lines


# ------------------------------------------------------------------------------- lines and convergence


def _c(decision_values, margin=0.01, looks=(6,)):
    ssa, base = decision_values
    return vd.contrast(ssa, base, list(looks), "minimize", "val_loss", margin, vd.design({"min": 6, "max": 6}))


def test_each_decision_has_its_line_and_json():
    base = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    cases = {
        "helps": [b - 0.05 + d for b, d in zip(base, [0, 0.001, -0.001, 0, 0.002, -0.002])],
        "hurts": [b + 0.05 + d for b, d in zip(base, [0, 0.001, -0.001, 0, 0.002, -0.002])],
        "equivalent": [b + d for b, d in zip(base, [0, 0.0005, -0.0005, 0.0002, -0.0002, 0])],
        "undecided": [b + d for b, d in zip(base, [0.03, -0.04, 0.02, -0.03, 0.05, -0.02])],
    }
    for decision, ssa in cases.items():
        c = _c((ssa, base))
        assert c["decision"] == decision
        assert c["answer"].startswith(f"{decision}: val_loss SSA − baseline = ")
        assert json.loads(json.dumps(c))["decision"] == decision
        rec = vd.recommend(c, {"latency_ms_per_token": {"ssa": 1.5, "baseline": 1.0}}, vd.DEFAULT_MAX_COST)
        assert "×1.50 decode" in rec["text"] or decision == "undecided"
    helps = _c((cases["helps"], base))
    assert "beyond the ±0.01 margin" in helps["answer"]
    # helps beyond the margin, but decode costs more than tolerated: keep plain attention, and say why
    rec = vd.recommend(helps, {"latency_ms_per_token": {"ssa": 1.5, "baseline": 1.0}}, vd.DEFAULT_MAX_COST)
    assert rec["action"] == "keep" and "tolerance ×1.10" in rec["text"]
    cheap = vd.recommend(helps, {"latency_ms_per_token": {"ssa": 1.04, "baseline": 1.0}}, vd.DEFAULT_MAX_COST)
    assert cheap["action"] == "adopt" and cheap["text"].startswith("adopt SSA: -0.05 val_loss [")
    eq = vd.recommend(_c((cases["equivalent"], base)), {}, vd.DEFAULT_MAX_COST)
    assert eq["text"] == "keep plain attention: equivalent within ±0.01"


def test_tokens_to_reach_interpolates_and_convergence_ratio():
    hist = [(100, 2.0), (200, 1.0), (300, 0.5)]
    assert vd.tokens_to_reach(hist, 1.5, "minimize") == pytest.approx(150)
    assert vd.tokens_to_reach(hist, 0.4, "minimize") is None
    assert vd.tokens_to_reach([(100, 0.5), (200, 0.9)], 0.8, "maximize") == pytest.approx(175)
    base = [[(100, 2.0), (200, 1.0)]] * 3
    fast = [[(100, 1.0), (200, 0.9)]] * 3  # reaches 1.0 at 100 tokens: half the baseline's
    c = vd.convergence(fast, base, "minimize")
    assert c["ratio"] == pytest.approx(0.5) and c["n"] == 3 and c["censored"] == 0
    never = vd.convergence([[(100, 3.0), (200, 2.0)]] * 2, base[:2], "minimize")
    assert never["censored"] == 2 and never["ratio"] == pytest.approx(1.0)  # counted at its whole budget


def test_the_convergence_sentence_says_when_ssa_never_got_there():
    """SmolLM2 on PTB: SSA never reached the baseline's final loss on any of 3 seeds, and the closing line
    said "SSA needs ×1 the baseline's training tokens (interval ×1–×1)". A censored ratio is a lower bound."""
    base = [[(100, 2.0), (200, 1.0)]] * 3
    never = vd.convergence([[(100, 3.0), (200, 2.0)]] * 3, base, "minimize")
    text = vd.convergence_text(never, "val_loss")
    assert text.startswith("SSA did not reach the baseline's final val_loss within its training budget on any of "
                           "3 seed(s)") and "needs ×1" not in text
    some = vd.convergence([[(100, 3.0), (200, 2.0)], [(100, 1.0), (200, 0.9)], [(100, 1.0), (200, 0.9)]], base,
                          "minimize")
    assert vd.convergence_text(some, "val_loss").startswith("SSA needs at least ×")
    fast = vd.convergence([[(100, 1.0), (200, 0.9)]] * 3, base, "minimize")
    assert vd.convergence_text(fast, "val_loss").startswith("SSA needs ×0.5 the baseline's training tokens")
