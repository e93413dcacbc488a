"""Export a study's winner as a config file that `ssa_tune.load_config` reads in any project."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import study as st
from .config import SSAConfig, save_config
from .errors import UserError
from .selection import pareto_front, spec_rule
from .spec import validate

# When the baseline wins, the exported SSAConfig is the identity (no position term, no gates): converting a
# model with it leaves the model's function unchanged, which is what "SSA does not help here" means.
IDENTITY = SSAConfig(query_position="none")


def _metrics(target, run_id: str | None) -> dict[str, Any]:
    if not run_id:
        return {}
    try:
        from .track import _client

        return {k: v for k, v in _client(target.tracking).get_run(run_id).data.metrics.items()
                if not k.startswith("layer")}
    except Exception:  # noqa: BLE001 - the export still stands without the mirror's numbers
        return {}


def winner(study, spec, rule=None, arm: str | None = None) -> dict[str, Any]:
    """What the study recommends: with a rule (--where/--pick, or the spec's `select:`), the trial it picks
    (from the Pareto front of a multi-objective study); else the robustness stage's winner when it ran (a
    trial, or the baseline's default configuration when no baseline trial finished); else the search's best.
    With `arm` ("ssa" or "baseline"), the same among that arm's configurations only (the robustness stage's
    choice for the arm: the one its verdict compared)."""
    if arm is not None and arm not in spec.arms:
        raise UserError(f"must be one of this study's arms ({', '.join(spec.arms)}), got {arm!r}", field="--arm")
    rob = study.user_attrs.get(st.ATTR_ROBUSTNESS)
    picked = None if not rob else rob.get("winner") if arm is None else (rob.get("chosen") or {}).get(arm)
    of_arm = "" if arm is None else f"the {arm} arm's best: "
    if rule is not None and not (rob and rob.get("rule") == rule.to_dict() and picked):
        objectives = [o.metric for o in spec.objectives]
        rows = st.rows(study, objectives, arm)
        pool = pareto_front(rows, objectives, [o.direction for o in spec.objectives]) if spec.multi_objective else rows
        chosen = rule.choose(pool)
        if chosen is None:
            shown = "; ".join(f"#{r['number']} " + ", ".join(f"{m}={_g(r['metrics'].get(m))}" for m in sorted(rule.metrics))
                              for r in pool[:6]) or "no complete trial"
            raise UserError(f"no {'front member' if spec.multi_objective else 'complete trial'} satisfies "
                            f"{' and '.join(map(str, rule.where))} ({shown})", field="--where")
        t = study.trials[chosen["number"]]
        return {"id": chosen["id"], "trial": t, "params": dict(t.params), "robust": None, "rob": rob, "rule": rule,
                "selected_by": f"{of_arm}rule over the {'Pareto front' if spec.multi_objective else 'complete trials'} "
                               f"(one seed each): {rule.describe()}"}
    if picked:
        cid = picked
        row = rob["summary"][cid]
        trial = study.trials[int(cid.split("-", 1)[1])] if cid.startswith("trial-") else None
        fails = f", {row.get('failed', 0)} failed" if row.get("failed") else ""
        by = (f"{of_arm}robust score over {row['seeds']} fresh seeds{fails}: {rob['objective']} "
              f"{row['mean']:.6g} +- {row['std']:.6g} (penalty {rob['penalty']})")
        if rob.get("rule"):
            by += f"; among the front members where {' and '.join(rob['rule']['where']) or 'anything'}"
        return {"id": cid, "trial": trial, "params": dict(rob["configs"][cid]), "robust": row, "rob": rob,
                "selected_by": by, "rule": rob.get("rule")}
    t = st.best_trial(study, arm)
    if t is None:
        what = f"study {study.study_name!r}" if arm is None else f"the {arm} arm of study {study.study_name!r}"
        raise UserError(f"{what} has no complete trial to export", field="--arm" if arm else "STUDY")
    return {"id": f"trial-{t.number}", "trial": t, "params": dict(t.params), "robust": None, "rob": rob,
            "selected_by": f"{of_arm}best search objective (one seed; no robustness stage ran)"}


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def export_best(study, target, path: Path, rule=None, arm: str | None = None) -> tuple[Path, dict[str, Any]]:
    spec = validate(st.study_spec(study), study.user_attrs.get(st.ATTR_SPEC_PATH, study.study_name), check_data=False)
    if rule is None:
        rule = spec_rule(spec)
    if rule is None and spec.multi_objective:
        raise UserError("a multi-objective study has a Pareto front, not one best trial: say how to choose, e.g. "
                        f"--pick {spec.objectives[0].metric} --where \"{spec.objectives[1].metric} <= ...\" "
                        "(or a `select:` section in the spec)", field="--pick")
    w = winner(study, spec, rule, arm)
    dataset, model, train, ssa = spec.trial_config(w["params"])
    kind = "ssa" if ssa is not None else "baseline"
    t = w["trial"]
    run_id = st.run_id(study, t) if t is not None else None
    metrics = _metrics(target, run_id)
    objective = spec.objectives[0]
    arms = {}
    for name in spec.arms:  # what each arm's search found (one seed), beside the winner
        b = st.best_trial(study, name)
        arms[name] = None if b is None else {"trial": b.number, "value": b.value if len(b.values) == 1 else b.values}
    info = {"name": study.study_name, "trial": None if t is None else t.number, "config": w["id"], "arms": arms,
            "arm": st.arm_of(t) if t is not None else kind, "objective": objective.metric,
            "direction": objective.direction,
            "value": None if t is None else (t.value if len(t.values) == 1 else list(t.values)),
            "storage": st.redact(target.storage), "tracking_uri": st.redact(target.tracking), "mlflow_run_id": run_id}
    rule_used = w.get("rule")
    source = {"winner": kind, "selected_by": w["selected_by"],
              **({"rule": rule_used.to_dict() if hasattr(rule_used, "to_dict") else rule_used} if rule_used else {}),
              "note": (f"the {arm} arm's best configuration (--arm {arm}), whichever arm won the study"
                       + ("" if kind == "ssa" else "; this SSAConfig is the identity (convert leaves the model as it is)"))
              if arm else "SSA settings of the winning configuration" if kind == "ssa" else
              "the baseline (plain attention) won; this SSAConfig is the identity (convert leaves the model as it is)"}
    if w["robust"] is not None:
        rob, row = w["rob"], w["robust"]
        metrics = {**metrics, f"robust_{rob['objective']}_mean": row["mean"], f"robust_{rob['objective']}_std": row["std"]}
        lc = rob.get("long_context") or {}
        if lc.get("flagged", {}).get(w["id"]):
            source["long_range_guard"] = "below the baseline's long-context accuracy (constraint off)"
        if rob.get("verdict"):
            v = rob["verdict"]
            source["verdict"] = v["answer"]
            source["decision"] = v.get("decision", "undecided")
            if v.get("recommendation"):
                source["recommendation"] = v["recommendation"]["text"]
    path = save_config(ssa or IDENTITY, path, model=model.to_dict(), train=train.to_dict(), dataset=dataset,
                       metrics=metrics, study=info, source=source)
    how = "robust score" if w["robust"] is not None else "rule" if rule_used else "search best"
    return path, {"trial": info["trial"] if info["trial"] is not None else w["id"], "winner": kind, "selected_by": how}
