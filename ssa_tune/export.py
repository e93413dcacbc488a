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


def _robust_winner(study):
    """The robustness stage's winner (trial, summary row) when it ran and chose one."""
    from .tune import ATTR_ROBUSTNESS

    rob = study.user_attrs.get(ATTR_ROBUSTNESS)
    if not rob or not rob.get("winner") or not str(rob["winner"]).startswith("trial-"):
        return None, rob
    number = int(rob["winner"].split("-", 1)[1])
    return study.trials[number], rob


def export_best(study, target, path: Path, trial=None) -> tuple[Path, dict[str, Any]]:
    rt, rob = _robust_winner(study)
    t = trial or rt or st.best_trial(study)
    if t is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to export", field="STUDY")
    spec = validate(st.study_spec(study), study.user_attrs.get(st.ATTR_SPEC_PATH, study.study_name), check_data=False)
    dataset, model, train, ssa = spec.trial_config(dict(t.params))
    winner = "ssa" if ssa is not None else "baseline"
    metrics: dict[str, Any] = {}
    run_id = t.user_attrs.get(st.T_RUN)
    if run_id:
        try:
            from .track import _client

            metrics = {k: v for k, v in _client(target.tracking).get_run(run_id).data.metrics.items()
                       if not k.startswith("layer")}
        except Exception:
            metrics = {}
    objective = spec.objectives[0]
    info = {"name": study.study_name, "trial": t.number, "objective": objective.metric,
            "direction": objective.direction, "value": t.value if len(t.values) == 1 else list(t.values),
            "storage": st.redact(target.storage), "tracking_uri": target.tracking,
            "mlflow_run_id": run_id}
    source = {"winner": winner,
              "note": "SSA settings of the best trial" if winner == "ssa" else
              "the baseline (plain attention) won; this SSAConfig is the identity (convert leaves the model as it is)"}
    if rt is not None and t is rt:
        row = rob["summary"][f"trial-{t.number}"]
        source["selected_by"] = (f"robust score over {row['seeds']} fresh seeds: {rob['objective']} "
                                 f"{row['mean']:.6g} +- {row['std']:.6g} (penalty {rob['penalty']})")
        metrics = {**metrics, f"robust_{rob['objective']}_mean": row["mean"], f"robust_{rob['objective']}_std": row["std"]}
        lc = rob.get("long_context") or {}
        if lc.get("flagged", {}).get(f"trial-{t.number}"):
            source["long_range_guard"] = "below the baseline's long-context accuracy (constraint off)"
    else:
        source["selected_by"] = "best search objective (one seed; no robustness stage ran)"
    path = save_config(ssa or IDENTITY, path, model=model.to_dict(), train=train.to_dict(), dataset=dataset,
                       metrics=metrics, study=info, source=source)
    return path, {"trial": t.number, "winner": winner}
