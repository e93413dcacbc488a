"""Export a study's winner as a config file that `ssa_tune.load_config` reads in any project."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import study as st
from .config import SSAConfig, save_config
from .errors import UserError
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


def winner(study) -> dict[str, Any]:
    """What the study recommends: the robustness stage's winner when it ran (a trial, or the baseline's
    default configuration when no baseline trial finished), else the best trial of the search."""
    from .robustness import ATTR_ROBUSTNESS

    rob = study.user_attrs.get(ATTR_ROBUSTNESS)
    if rob and rob.get("winner"):
        cid = rob["winner"]
        row = rob["summary"][cid]
        trial = study.trials[int(cid.split("-", 1)[1])] if cid.startswith("trial-") else None
        fails = f", {row.get('failed', 0)} failed" if row.get("failed") else ""
        return {"id": cid, "trial": trial, "params": dict(rob["configs"][cid]), "robust": row, "rob": rob,
                "selected_by": (f"robust score over {row['seeds']} fresh seeds{fails}: {rob['objective']} "
                                f"{row['mean']:.6g} +- {row['std']:.6g} (penalty {rob['penalty']})")}
    t = st.best_trial(study)
    if t is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to export", field="STUDY")
    return {"id": f"trial-{t.number}", "trial": t, "params": dict(t.params), "robust": None, "rob": rob,
            "selected_by": "best search objective (one seed; no robustness stage ran)"}


def export_best(study, target, path: Path) -> tuple[Path, dict[str, Any]]:
    w = winner(study)
    spec = validate(st.study_spec(study), study.user_attrs.get(st.ATTR_SPEC_PATH, study.study_name), check_data=False)
    dataset, model, train, ssa = spec.trial_config(w["params"])
    kind = "ssa" if ssa is not None else "baseline"
    t = w["trial"]
    run_id = st.run_id(study, t) if t is not None else None
    metrics = _metrics(target, run_id)
    objective = spec.objectives[0]
    arms = {}
    for arm in spec.arms:  # what each arm's search found (one seed), beside the winner
        b = st.best_trial(study, arm)
        arms[arm] = None if b is None else {"trial": b.number, "value": b.value if len(b.values) == 1 else b.values}
    info = {"name": study.study_name, "trial": None if t is None else t.number, "config": w["id"], "arms": arms,
            "arm": st.arm_of(t) if t is not None else kind, "objective": objective.metric,
            "direction": objective.direction,
            "value": None if t is None else (t.value if len(t.values) == 1 else list(t.values)),
            "storage": st.redact(target.storage), "tracking_uri": st.redact(target.tracking), "mlflow_run_id": run_id}
    source = {"winner": kind, "selected_by": w["selected_by"],
              "note": "SSA settings of the winning configuration" if kind == "ssa" else
              "the baseline (plain attention) won; this SSAConfig is the identity (convert leaves the model as it is)"}
    if w["robust"] is not None:
        rob, row = w["rob"], w["robust"]
        metrics = {**metrics, f"robust_{rob['objective']}_mean": row["mean"], f"robust_{rob['objective']}_std": row["std"]}
        lc = rob.get("long_context") or {}
        if lc.get("flagged", {}).get(w["id"]):
            source["long_range_guard"] = "below the baseline's long-context accuracy (constraint off)"
        if rob.get("verdict"):
            source["verdict"] = rob["verdict"]["answer"]
    path = save_config(ssa or IDENTITY, path, model=model.to_dict(), train=train.to_dict(), dataset=dataset,
                       metrics=metrics, study=info, source=source)
    return path, {"trial": info["trial"] if info["trial"] is not None else w["id"], "winner": kind,
                  "selected_by": "robust score" if w["robust"] is not None else "search best"}
