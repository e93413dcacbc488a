"""Per-dataset answers: importances with intervals, the robust score, rank stability, the verdict."""

from __future__ import annotations

import math

import optuna
import pytest

from ssa_tune import analyse


def _study_where_only_x_matters(n: int = 100, seed: int = 0) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))

    def objective(trial):
        x = trial.suggest_float("x", -3, 3)
        trial.suggest_float("y", -3, 3)
        trial.suggest_categorical("z", ["a", "b", "c"])
        return x * x

    study.optimize(objective, n_trials=n)
    return study


@pytest.mark.parametrize("evaluator", ["fanova", "ped_anova"])
def test_the_one_driving_parameter_ranks_first_with_a_separate_interval(evaluator):
    imp = analyse.importances(_study_where_only_x_matters(), repeats=10, evaluators=(evaluator,))[evaluator]
    assert list(imp)[0] == "x"
    assert set(imp) == {"x", "y", "z"}
    for other in ("y", "z"):
        assert imp["x"]["low"] > imp[other]["high"], imp
    for row in imp.values():
        assert row["low"] <= row["mean"] <= row["high"] and row["repeats"] == 10


def test_importances_respect_the_direction():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: -abs(t.suggest_float("a", -1, 1)) + 0 * t.suggest_float("b", -1, 1), n_trials=40)
    imp = analyse.importances(study, repeats=6, evaluators=("ped_anova",))["ped_anova"]
    assert list(imp)[0] == "a"


def test_conditional_ssa_params_get_their_own_group():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))

    def objective(trial):
        lr = trial.suggest_float("train.lr", 1e-3, 1e-2, log=True)
        if trial.suggest_categorical("ssa.enabled", [True, False]):
            gate = trial.suggest_categorical("ssa.query_gate", ["none", "shared"])
            return lr * 100 + (0.5 if gate == "none" else 0.0)
        return lr * 100 + 0.4

    study.optimize(objective, n_trials=60)
    imp = analyse.importances(study, repeats=4, evaluators=("fanova",))["fanova"]
    assert imp["ssa.query_gate"]["group"] == "SSA trials"
    assert imp["train.lr"]["group"] == "all trials"


def test_robust_score_prefers_the_stable_config():
    results = {"lucky": [0.40, 1.50, 0.45], "stable": [0.90, 0.92, 0.88]}  # lucky: better mean, unstable
    assert sum(results["lucky"]) / 3 < sum(results["stable"]) / 3
    summary = analyse.robust_summary(results, "minimize", penalty=1.0)
    assert list(summary) == ["stable", "lucky"]
    assert summary["stable"]["rank"] == 1
    assert summary["lucky"]["score"] == pytest.approx(summary["lucky"]["mean"] + summary["lucky"]["std"])
    # with no penalty the mean decides
    assert list(analyse.robust_summary(results, "minimize", penalty=0.0)) == ["lucky", "stable"]
    # maximising (accuracy): mean - std
    acc = {"lucky": [0.9, 0.1, 0.95], "stable": [0.6, 0.62, 0.61]}
    assert list(analyse.robust_summary(acc, "maximize", penalty=1.0))[0] == "stable"


def test_failed_seeds_are_penalised_never_rewarded():
    """A config whose other seeds failed must not look more robust than one that finished every seed (its
    std over the one survivor would be 0): a failed seed counts as the worst value seen."""
    summary = analyse.robust_summary({"steady": [1.0, 1.02, 0.98], "fragile": [0.9, None, None],
                                      "dead": [None, None, None]}, "minimize")
    assert list(summary) == ["steady", "fragile", "dead"]
    assert summary["fragile"]["failed"] == 2 and summary["fragile"]["seeds"] == 3
    assert summary["fragile"]["mean"] > 0.9 and summary["fragile"]["std"] > 0
    assert summary["dead"]["score"] is None
    acc = analyse.robust_summary({"steady": [0.8, 0.81, 0.79], "fragile": [0.9, None, None]}, "maximize")
    assert list(acc) == ["steady", "fragile"]


def test_rank_stability():
    same = {"a": [1, 1.1, 1.2], "b": [2, 2.1, 2.2], "c": [3, 3.1, 3.2]}
    assert analyse.rank_stability(same) == pytest.approx(1.0)
    flip = {"a": [1, 3], "b": [2, 2], "c": [3, 1]}
    assert analyse.rank_stability(flip) == pytest.approx(-1.0)


def test_paired_interval_matches_scipy_and_uses_the_pairing():
    from scipy import stats

    # seed effects shared by both arms dominate the spread; the per-seed difference is steady
    a, b = [1.0, 1.6, 0.7, 1.3], [1.1, 1.72, 0.79, 1.41]
    d = analyse.paired_difference(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d["low"] == pytest.approx(ci.low) and d["high"] == pytest.approx(ci.high)
    assert d["n"] == 4 and d["high"] < 0  # paired, the difference is clear ...
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert welch.low < 0 < welch.high  # ... which an unpaired interval would have missed
    # a seed where one side failed stays in the pairs, against that side (the worst value seen: 2.0)
    failed = analyse.paired_difference([1.0, None, 2.0], [0.5, 1.0, None])
    assert failed["n"] == 3 and failed["per_seed"] == [0.5, 1.0, 0.0] and failed["failed"] == [1, 1]


def test_long_range_flags():
    flags = analyse.long_range_flags({"base": [0.8, 0.9], "good": [0.9, 0.85], "bad": [0.2, 0.3]}, "base")
    assert flags == {"good": False, "bad": True}


def test_a_failed_long_context_run_counts_and_crashes_nothing():
    """A probe run that failed (None) must not crash the stage after all its training: it counts as accuracy
    0, for the baseline as for the others."""
    flags = analyse.long_range_flags({"base": [0.9, None], "fine": [0.9, 0.9], "broken": [None, None]}, "base")
    assert flags == {"fine": False, "broken": True}
    assert analyse.long_range_flags({"base": [None, None], "x": [0.5, 0.5]}, "base") == {}


def test_the_reports_resamples_default_to_200_and_follow_the_setting(monkeypatch):
    monkeypatch.delenv(analyse.RESAMPLES_ENV, raising=False)
    assert analyse.resamples() == 200
    monkeypatch.setenv(analyse.RESAMPLES_ENV, "40")
    assert analyse.resamples() == 40
