"""The robustness stage: re-train the study's best configurations on fresh seeds, pick the robust winner,
then confirm SSA against the baseline on seeds nobody chose anything on.

1. Selection: the top-k trials and the best trial of each arm, each re-trained on `seeds` fresh training
   seeds (10000, 10001, ...), plus the optional long-context and noise variants. The robust winner has the
   best robust score (mean + penalty x std, a failed seed counting as the worst value seen).
2. Confirmation: the best SSA configuration and the best baseline configuration of step 1, and the baseline's
   with the SSA arm's `ssa` section added (nothing else changed), re-trained on further seeds (20000, ...)
   in rounds, until the sequential design of `confirm_seeds` decides (`ssa_tune.verdict`). Two contrasts,
   both paired by seed: *deploy* (each arm's robust best, what the recommendation uses) and *SSA alone*
   (what SSA itself does, at far lower variance). The runs that picked the configurations are never the
   runs that test them (no winner's curse).

Seeds vary training only (batches, initialisation): every run is evaluated on the same validation data
(`dataset.eval_seed` fixed to the study's), so the spread is the model's, not the evaluation set's.

The stage is a `Plan` of training runs that the study's own Ray Tune run executes right after the search,
on the same warm workers (`tune.fit`); this module decides what to run and what the results mean.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any, Callable

from . import analyse
from . import study as st
from . import verdict as vd
from .config import GPTConfig
from .errors import UserError
from .selection import pareto_front, spec_rule
from .spec import SSA_SWITCH, JobSpec, Objective, validate
from .trial import trial_params

DEFAULTS = {"top_k": 3, "seeds": 3, "confirm_seeds": None, "penalty": 1.0, "long_context": None, "noise": None,
            "constraint": False}
ALONE = "+ssa"  # the SSA-alone configuration's id: the baseline's id and this
CONTRAST_ROLES = (("deploy", "ssa"), ("ssa_alone", "ssa_alone"))  # contrast -> the role compared with the baseline
SELECT_SEED, CONFIRM_SEED = 10_000, 20_000
HANDOVER_S = 0.5  # a run's hand-over to the next on its worker and the driver's records, at most (0.1 s measured)
COSTS = ("latency_ms_per_token", "peak_mem_mb", "n_params", "tokens_per_s")
FINISHED = "finished"


def variant_spec(spec: JobSpec, dataset_override: dict | None) -> JobSpec:
    """The spec with another dataset (an override with `kind` replaces it, one without is merged)."""
    if not dataset_override:
        return spec
    dataset = dict(dataset_override) if "kind" in dataset_override else {**spec.dataset, **dataset_override}
    raw = {**spec.raw, "dataset": dataset}
    model = dict(spec.raw.get("model") or {})
    seq_len = dataset.get("seq_len")
    if model.get("kind", "gpt") != "hf" and isinstance(seq_len, int) and \
            seq_len > int(model.get("seq_len") or GPTConfig.seq_len):
        # the variant trains a built-in model of its own: sized to its sequences (a passkey probe of 256
        # tokens on a study of 128-token models), as a checkpoint cannot be
        raw["model"] = {**model, "seq_len": seq_len}
    return validate(raw, spec.path, check_data=False)


def _eval_seed(spec: JobSpec) -> int:
    """The evaluation data every robustness run is scored on: the study's own."""
    es = spec.dataset.get("eval_seed")
    return int(es) if es is not None else int(spec.train_config({}).seed)


class Plan:
    """The runs of the stage, handed out as they become decidable: all selection runs, then (once every one
    has finished) the confirmation runs. `next_job()` gives a job, None (wait for running jobs) or FINISHED;
    `record(job, result)` takes a run's outcome {"ok", "metrics" | "reason"}; `finish()` computes the answers,
    stores them on the study and returns them."""

    def __init__(self, study, spec: JobSpec, out: Callable[[str], None] = print, deadline: float | None = None):
        self.study, self.spec, self.out = study, spec, out
        # (time.monotonic) a confirmation round that could not end by then is not started (`ssa-tune poc`)
        self.deadline = deadline
        self.cut: str | None = None
        self._run_s = 0.0  # the longest run of the stage so far, wall seconds
        r = self.r = {**DEFAULTS, **(spec.robustness or {})}
        # with a `select:` rule the stage ranks by its pick metric and keeps to its conditions: stability is
        # the third axis of the configurations the rule allows
        self.rule = spec_rule(spec)
        self.objective = Objective(self.rule.pick, self.rule.direction) if self.rule else spec.objectives[0]
        sign = 1 if self.objective.direction == "minimize" else -1
        names = [o.metric for o in spec.objectives]
        rows = {row["number"]: row for row in st.rows(study, names)}
        pool = list(rows.values())
        if spec.multi_objective:
            pool = pareto_front(pool, names, [o.direction for o in spec.objectives])
        if self.rule:
            pool = self.rule.satisfied(pool)
        pool = [row for row in pool if isinstance(row["metrics"].get(self.objective.metric), (int, float))
                and math.isfinite(row["metrics"][self.objective.metric])]
        if not pool:
            raise UserError(f"study {study.study_name!r} has no complete trial to re-run"
                            + (f" that satisfies {self.rule.describe()}" if self.rule else ""), field="STUDY")
        pool.sort(key=lambda row: (sign * row["metrics"][self.objective.metric], row["number"]))
        unique: dict[str, dict] = {}  # a configuration once (a re-run of a lost trial has the same parameters)
        for row in pool:
            unique.setdefault(repr(sorted(row["params"].items())), row)
        pool = list(unique.values())
        self.configs = {row["id"]: dict(row["params"]) for row in pool[:int(r["top_k"])]}
        self.arms = {row["id"]: row["arm"] for row in rows.values()}
        self.best_of_arm: dict[str, str] = {}
        for arm in spec.arms:
            members = [row for row in pool if row["arm"] == arm]
            if members:
                self.best_of_arm[arm] = members[0]["id"]
                self.configs.setdefault(members[0]["id"], dict(members[0]["params"]))
        if len(spec.arms) > 1 and "baseline" not in self.best_of_arm:  # no baseline finished: its default runs
            self.configs["baseline"] = spec.baseline_params()
            self.arms["baseline"] = self.best_of_arm["baseline"] = "baseline"
        self.arms = {c: self.arms.get(c, "ssa" if self.configs[c].get(SSA_SWITCH, True) else "baseline")
                     for c in self.configs}
        self.select_ids = list(self.configs)  # the configurations of the selection (the confirmation adds one)
        self.eval_seed = _eval_seed(spec)
        self.seeds = [SELECT_SEED + i for i in range(int(r["seeds"]))]
        self.design = vd.design(r["confirm_seeds"])
        self.confirm_seeds: list[int] = []  # the seeds run so far, round after round
        self.looks: list[int] = []  # how many seeds had run at each look
        self.pair: dict[str, str] = {}  # role (ssa, baseline, ssa_alone) -> config id
        v = spec.verdict
        self.margin_spec = v["margin"] if v.get("margin") is not None else vd.default_margin(self.objective.metric)
        self.max_cost = v["max_cost"]
        self.margin: float | None = None
        self.variants = {"main": spec}
        for name in ("long_context", "noise"):
            if r.get(name):
                self.variants[name] = variant_spec(spec, r[name])
        self.results: dict[tuple, dict] = {}
        self.stage = "select"
        self._queue = [self._job("select", cid, v, s) for v in self.variants for cid in self.configs for s in self.seeds]
        self._waiting = {j["key"] for j in self._queue}
        self.summary: dict = {}
        self.chosen: dict[str, str] = {}
        out(f"robustness: {len(self.configs)} configs x {len(self.seeds)} seeds x {len(self.variants)} variant(s) "
            f"= {len(self._queue)} runs, then the best of each arm on " + (
                f"{self.design.max_pairs} new seeds" if self.design.min_pairs == self.design.max_pairs else
                f"{self.design.min_pairs} to {self.design.max_pairs} new seeds, until decided"))

    def _job(self, stage: str, cid: str, variant: str, seed: int) -> dict:
        params = {**self.configs[cid], "train.seed": seed, "dataset.eval_seed": self.eval_seed}
        return {"key": f"robust-{cid}-{variant}-s{seed}", "stage": stage, "config": cid, "variant": variant,
                "seed": seed, "params": params, "arm": self.arms[cid]}

    def mlflow_params(self, job: dict) -> dict[str, Any]:
        d, m, t, s = self.variants[job["variant"]].trial_config(job["params"])
        return trial_params(d, m, t, s)

    def variants_raw(self) -> dict[str, dict]:
        return {name: v.raw for name, v in self.variants.items()}

    # ------------------------------------------------------------------------------------- handing out

    def next_job(self):
        if self._queue:
            return self._queue.pop(0)
        if self._waiting:
            return None
        if self.stage == "select":
            self._select()
            ssa_id, base_id = self.chosen.get("ssa"), self.chosen.get("baseline")
            if len(self.spec.arms) > 1 and ssa_id and base_id:
                self.stage = "confirm"
                self.pair = {"ssa": ssa_id, "baseline": base_id, "ssa_alone": self._alone(ssa_id, base_id)}
                alone = "" if self.pair["ssa_alone"] == ssa_id else f" and {self.pair['ssa_alone']} (SSA alone)"
                self.out(f"robustness: best SSA {ssa_id} vs best baseline {base_id}{alone}, seed pairs in rounds "
                         f"at {self.design.looks()} until decided")
                if self._time_for_round():
                    self._round()
                    return self._queue.pop(0)
        elif self.stage == "confirm":
            self.looks.append(len(self.confirm_seeds))
            decided = self._contrasts()
            d = decided["deploy"]
            self.out(f"robustness: after {len(self.confirm_seeds)} seed pairs: deploy {d['decision']}, SSA alone "
                     f"{decided['ssa_alone']['decision']}")
            if not all(c["final"] for c in decided.values()) and self._time_for_round():
                self._round()
                return self._queue.pop(0)
        self.stage = "done"
        return FINISHED

    def _alone(self, ssa_id: str, base_id: str) -> str:
        """The baseline's configuration with the SSA arm's `ssa` section added (its id, or the SSA config's
        own when that is already the same thing)."""
        ssa_params = {k: v for k, v in self.configs[ssa_id].items() if k.startswith("ssa.")}
        params = {**{k: v for k, v in self.configs[base_id].items() if not k.startswith("ssa.")}, **ssa_params,
                  SSA_SWITCH: True}
        if params == self.configs[ssa_id]:
            return ssa_id
        cid = base_id + ALONE
        self.configs[cid], self.arms[cid] = params, "ssa"
        return cid

    def _time_for_round(self) -> bool:
        """Whether the next confirmation round can end before the deadline (always, without one). When it
        cannot, the stage stops at the last look taken and says so (`cut`): stopping for time, whatever the data
        say, only withholds a decision, so the design's error rates still hold for the answer given."""
        if self.deadline is None:
            return True
        seeds = self._next_seeds()
        runs = len(seeds) * len(self.confirm_ids)
        need = -(-runs // self._slots()) * self._run_s
        left = self.deadline - time.monotonic()
        if need <= left:
            return True
        self.cut = (f"the time ran short: the next confirmation round ({runs} runs, ~{need:.0f} s) would end after "
                    f"the deadline ({max(0.0, left):.0f} s left); stopped at {len(self.confirm_seeds)} seed pairs "
                    f"of up to {self.design.max_pairs}")
        self.out(f"robustness: {self.cut}")
        return False

    def _next_seeds(self) -> list[int]:
        """The seeds of the next confirmation round: up to the design's next look."""
        n = len(self.confirm_seeds)
        upto = self.design.next_look(n) if n else self.design.min_pairs
        return [CONFIRM_SEED + i for i in range(n, upto)]

    def _slots(self) -> int:
        """Runs of the stage at a time."""
        return max(1, int(self.spec.resources.get("max_concurrent") or 1))

    def _round(self) -> None:
        seeds = self._next_seeds()
        self.confirm_seeds += seeds
        self._queue = [self._job("confirm", cid, "main", s) for s in seeds for cid in self.confirm_ids]
        self._waiting = {j["key"] for j in self._queue}

    def record(self, job: dict, result: dict) -> None:
        self.results[(job["stage"], job["config"], job["variant"], job["seed"])] = result
        self._waiting.discard(job["key"])
        m = result.get("metrics") or {}
        if isinstance(m.get("seconds"), (int, float)):  # the run's wall time, its set-up and hand-over included
            self._run_s = max(self._run_s, m["seconds"] + float(m.get("setup_seconds") or 0.0) + HANDOVER_S)
        value = result["metrics"].get(self.objective.metric) if result["ok"] else None
        shown = "-" if value is None else f"{value:.4f}"
        self.out(f"  robust {job['stage']:<7} {job['config']:<10} {job['variant']:<12} seed {job['seed']}: "
                 f"{self.objective.metric}={shown}" + ("" if result["ok"] else f" ({result['reason']})"))

    # ------------------------------------------------------------------------------------------ answers

    def table(self, stage: str, variant: str, metric: str, ids=None, seeds=None) -> dict[str, list]:
        rows: dict[str, list] = {}
        for cid in (self.select_ids if ids is None else ids):
            rows[cid] = []
            for seed in (seeds or self.seeds):
                res = self.results.get((stage, cid, variant, seed))
                v = res["metrics"].get(metric) if res and res["ok"] else None
                rows[cid].append(v if isinstance(v, (int, float)) and math.isfinite(v) else None)
        return rows

    def _long_context(self) -> tuple[str | None, dict, dict]:
        if "long_context" in self.variants:
            metric = "passkey_acc" if self.variants["long_context"].dataset["kind"] == "passkey" else "val_acc"
            table = self.table("select", "long_context", metric)
        elif self.spec.dataset["kind"] == "passkey":
            metric, table = "passkey_acc", self.table("select", "main", "passkey_acc")
        else:
            return None, {}, {}
        baseline_id = self.best_of_arm.get("baseline")
        return metric, table, (analyse.long_range_flags(table, baseline_id) if baseline_id else {})

    def _guard_unchecked(self, table: dict) -> str | None:
        """Why the long-range guard could check nothing, or None when it had its reference: the baseline's
        long-context probe must have finished on at least one seed."""
        baseline_id = self.best_of_arm.get("baseline")
        if baseline_id is None:
            return "not checked: the study has no baseline configuration to compare with"
        if analyse.guard_reference(table, baseline_id) is None:
            return (f"not checked: the baseline's long-context probe finished on none of its "
                    f"{len(table.get(baseline_id) or [])} seed(s), "
                    f"so nothing could be compared with it (no configuration was flagged)")
        return None

    def _select(self) -> None:
        main = self.table("select", "main", self.objective.metric)
        self.summary = analyse.robust_summary(main, self.objective.direction, float(self.r["penalty"]))
        _, _, flags = self._long_context()
        self.eligible = [c for c in self.summary
                         if self.summary[c]["score"] is not None and not (self.r["constraint"] and flags.get(c))]
        if self.rule and self.rule.where:  # the rule's conditions hold for the mean over the seeds too
            means = {}
            for cond in self.rule.where:
                for cid, vals in self.table("select", "main", cond.metric).items():
                    ok = [v for v in vals if v is not None]
                    means.setdefault(cid, {})[cond.metric] = statistics.fmean(ok) if ok else None
            self.eligible = [c for c in self.eligible if all(cond.holds(means.get(c, {})) for cond in self.rule.where)]
        for arm in self.spec.arms:
            ids = [c for c in self.eligible if self.arms.get(c) == arm]
            if ids:
                self.chosen[arm] = ids[0]

    def finish(self) -> dict[str, Any]:
        if not self.summary:
            self._select()
        objective = self.objective
        long_metric, long_table, flags = self._long_context()
        main = self.table("select", "main", objective.metric)
        winner = self.eligible[0] if self.eligible else None
        verdict, confirmation = None, None
        if self.pair and self.looks:
            verdict = self._verdict()
            confirmation = {"seeds": self.confirm_seeds, "looks": self.looks, "roles": self.pair,
                            "values": self.table("confirm", "main", objective.metric, self.confirm_ids,
                                                 self.confirm_seeds)}
        noise = self.table("select", "noise", objective.metric) if "noise" in self.variants else {}
        report = {
            "objective": objective.metric, "direction": objective.direction, "penalty": float(self.r["penalty"]),
            "seeds": self.seeds, "eval_seed": self.eval_seed, "configs": self.configs, "arms": self.arms,
            "baseline": self.best_of_arm.get("baseline"), "summary": self.summary,
            "rank_stability_kendall_tau": analyse.rank_stability(main),
            "long_context": {"metric": long_metric, "values": long_table, "flagged": flags,
                             "constraint": bool(self.r["constraint"]),
                             "unchecked": self._guard_unchecked(long_table)} if long_metric else None,
            "noise": {"metric": objective.metric, "values": noise} if noise else None,
            "winner": winner, "chosen": self.chosen, "best_ssa": self.chosen.get("ssa"),
            "confirmation": confirmation, "verdict": verdict,
            "rule": self.rule.to_dict() if self.rule else None, "cut": self.cut,
        }
        self.study.set_user_attr(st.ATTR_ROBUSTNESS, json.loads(json.dumps(report, default=str)))
        unchecked = report["long_context"]["unchecked"] if report["long_context"] else None
        if unchecked:
            self.out(f"long-range guard: {unchecked}")
        if winner:
            w = self.summary[winner]
            fails = f", {w['failed']} failed" if w["failed"] else ""
            self.out(f"robust winner: {winner} ({objective.metric} {w['mean']:.4f} +- {w['std']:.4f} over "
                     f"{w['seeds']} seeds{fails})")
        if verdict:
            self.out(f"verdict: {verdict['answer']}")
            self.out(f"SSA alone: {verdict['contrasts']['ssa_alone']['answer']}")
            conv_text = vd.convergence_text(verdict.get("convergence") or {}, objective.metric)
            if conv_text:
                self.out(f"convergence: {conv_text}")
            self.out(f"recommendation: {verdict['recommendation']['text']}")
        return report

    # --------------------------------------------------------------------------------- the confirmation

    @property
    def confirm_ids(self) -> list[str]:
        """The configurations the confirmation trains (two when SSA alone is the SSA arm's own best)."""
        return list(dict.fromkeys(self.pair.values()))

    def _seconds_per_pair(self) -> float | None:
        """Wall seconds one more seed pair costs: its runs' mean time over the concurrent slots."""
        secs = [res["metrics"].get("seconds") for (stage, *_), res in self.results.items()
                if stage == "confirm" and res["ok"]]
        secs = [x for x in secs if isinstance(x, (int, float))]
        if not secs:
            return None
        runs = len(self.confirm_ids)
        return statistics.fmean(secs) * runs / min(self._slots(), runs)

    def _contrasts(self) -> dict[str, dict]:
        metric, direction = self.objective.metric, self.objective.direction
        conf = self.table("confirm", "main", metric, self.confirm_ids, self.confirm_seeds)
        if self.margin is None:  # fixed at the first look: a relative margin takes the baseline's mean there
            self.margin = vd.margin_value(self.margin_spec, conf[self.pair["baseline"]][:self.looks[0]])
        label = vd.margin_label(self.margin_spec, self.margin)
        per_pair = self._seconds_per_pair()
        return {name: vd.contrast(conf[self.pair[role]], conf[self.pair["baseline"]], self.looks, direction, metric,
                                  self.margin, self.design, per_pair, label)
                for name, role in CONTRAST_ROLES}

    def _costs(self) -> dict[str, dict]:
        costs = {}
        ssa_id, base_id = self.pair["ssa"], self.pair["baseline"]
        for metric in COSTS:
            ct = self.table("confirm", "main", metric, [ssa_id, base_id], self.confirm_seeds)
            s_vals, b_vals = [v for v in ct[ssa_id] if v is not None], [v for v in ct[base_id] if v is not None]
            if s_vals and b_vals:
                s_mean, b_mean = statistics.fmean(s_vals), statistics.fmean(b_vals)
                costs[metric] = {"ssa": s_mean, "baseline": b_mean,
                                 "ssa_std": statistics.stdev(s_vals) if len(s_vals) > 1 else 0.0,
                                 "baseline_std": statistics.stdev(b_vals) if len(b_vals) > 1 else 0.0,
                                 "ratio": s_mean / b_mean if b_mean else None, "n": [len(s_vals), len(b_vals)]}
        return costs

    def _histories(self, cid: str) -> list:
        return [(self.results.get(("confirm", cid, "main", s)) or {}).get("history") for s in self.confirm_seeds]

    def _verdict(self) -> dict[str, Any]:
        contrasts = self._contrasts()
        deploy = contrasts["deploy"]
        costs = self._costs()
        direction = self.objective.direction
        base = self._histories(self.pair["baseline"])
        convergence = {name: vd.convergence(self._histories(self.pair[role]), base, direction)
                       for name, role in CONTRAST_ROLES}
        rec = vd.recommend(deploy, costs, self.max_cost)
        for name, c in contrasts.items():
            c["convergence"] = convergence[name]
            c["what"] = vd.CONTRASTS[name]
        if self.pair["ssa_alone"] == self.pair["ssa"]:
            contrasts["ssa_alone"]["what"] = ("the same runs as deploy: the SSA arm's best is the baseline's "
                                              "configuration with SSA added, nothing else changed")
        return {"decision": deploy["decision"], "answer": deploy["answer"], "recommendation": rec,
                "metric": self.objective.metric, "direction": direction, "margin": self.margin,
                "margin_spec": self.margin_spec, "margin_text": deploy["margin_text"],
                "ssa_minus_baseline": deploy["ssa_minus_baseline"], "failed": deploy["failed"],
                "contrasts": contrasts, "convergence": convergence["deploy"], "costs": costs,
                "ssa_config": self.pair["ssa"], "baseline_config": self.pair["baseline"],
                "ssa_alone_config": self.pair["ssa_alone"], "seeds": self.confirm_seeds, "looks": self.looks,
                "design": {"min": self.design.min_pairs, "max": self.design.max_pairs, "step": self.design.step,
                           "alpha": self.design.alpha, "alpha_eq": self.design.alpha_eq,
                           "gamma": self.design.gamma, "gamma_eq": self.design.gamma_eq}}
