"""The study report: one offline HTML page (plotly.js embedded), report.json with every number in it, and
PNGs of the main plots — written to a folder and logged as artifacts of the study's parent MLflow run."""

from __future__ import annotations

import datetime
import html
import json
import math
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import optuna
from optuna.trial import TrialState

from . import analyse
from . import study as st
from .driver import Target
from .study import ATTR_ROBUSTNESS
from .spec import SSA_SWITCH, validate


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>"
                                            for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _config_label(params: dict) -> str:
    if params.get(SSA_SWITCH) is False:
        return "baseline (no SSA)"
    keep = {k.removeprefix("ssa."): v for k, v in params.items() if k != SSA_SWITCH}
    return ", ".join(f"{k}={_fmt(v, 3)}" for k, v in keep.items())


def build(study: optuna.Study, target: Target, out_dir: Path, repeats: int | None = None) -> dict[str, Any]:
    """Compute everything and write report.html, report.json and the PNGs; returns the report dict.
    `repeats`: the importances' bootstrap resamples (default: `analyse.resamples()`, 200 unless set)."""
    repeats = analyse.resamples() if repeats is None else repeats
    spec = validate(st.study_spec(study), study.user_attrs.get(st.ATTR_SPEC_PATH, study.study_name), check_data=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    imps = {o.metric: analyse.importances(study, i, repeats=repeats) for i, o in enumerate(spec.objectives)}
    robust = study.user_attrs.get(ATTR_ROBUSTNESS)
    counts = st.counts(study)
    best = st.best_trial(study)
    objective = spec.objectives[0]
    verdict = (robust or {}).get("verdict") or _search_verdict(study, objective)
    report = {
        "study": study.study_name,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": spec.dataset, "objectives": [{"metric": o.metric, "direction": o.direction} for o in spec.objectives],
        "trials": counts,
        "arms": {arm: {"trials": st.counts(study, arm), "best": None if (b := st.best_trial(study, arm)) is None else
                       {"number": b.number, "values": b.values, "params": b.params}} for arm in spec.arms},
        "best_trial": None if best is None else {"number": best.number, "values": best.values, "params": best.params},
        "importances": {m: {p: {k: v[k] for k in ("mean", "low", "high")} | {"group": v["group"]}
                            for p, v in imp.get("fanova", {}).items()} for m, imp in imps.items()},
        "importances_by_evaluator": imps,
        "importance_resamples": repeats,
        "robustness": {} if not robust else {
            cid: {"mean": row["mean"], "std": row["std"], "seeds": row["values"], "failed": row.get("failed", 0),
                  "score": row["score"], "rank": row["rank"], "arm": (robust.get("arms") or {}).get(cid),
                  "params": robust["configs"][cid]}
            for cid, row in robust["summary"].items()},
        "robustness_seeds": (robust or {}).get("seeds"),
        "confirmation": (robust or {}).get("confirmation"),
        "rank_stability_kendall_tau": (robust or {}).get("rank_stability_kendall_tau"),
        "winner": (robust or {}).get("winner") or (None if best is None else f"trial-{best.number}"),
        "winner_selected_by": "robust score (mean + penalty x std over fresh seeds)" if robust else "search objective (single seed)",
        "long_context": (robust or {}).get("long_context"),
        "noise": (robust or {}).get("noise"),
        "verdict": verdict,
    }
    if spec.multi_objective:
        report["pareto"] = _front_data(study, spec)
    pngs = _pngs(study, report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.html").write_text(_html(study, spec, report, imps))
    report["files"] = ["report.html", "report.json", *pngs]
    return report


def _search_verdict(study: optuna.Study, objective) -> dict | None:
    """Without a robustness stage there is no verdict: the search's trials of the two arms have different
    settings and one seed each, so nothing pairs them. Say what the search found and what would decide."""
    best = {arm: st.best_trial(study, arm) for arm in ("ssa", "baseline")}
    if not all(best.values()):
        return None
    diff = best["ssa"].values[0] - best["baseline"].values[0]
    return {"metric": objective.metric, "direction": objective.direction, "costs": {}, "decision": "undecided",
            "ssa_minus_baseline": {"diff": diff, "low": None, "high": None, "n": 1, "method": "search best of each arm"},
            "answer": (f"undecided: the best SSA trial #{best['ssa'].number} minus the best baseline trial "
                       f"#{best['baseline'].number} is {diff:+.4g} {objective.metric} on one seed each; the "
                       "robustness stage re-trains both on shared seeds and decides")}


# ------------------------------------------------------------------------------------------------ figures


def _importance_figure(imp: dict[str, dict], title: str):
    import plotly.graph_objects as go

    names = list(imp)[::-1]
    means = [imp[n]["mean"] for n in names]
    fig = go.Figure(go.Bar(
        x=means, y=names, orientation="h", marker_color="#0969da",
        error_x=dict(type="data", symmetric=False, array=[imp[n]["high"] - imp[n]["mean"] for n in names],
                     arrayminus=[imp[n]["mean"] - imp[n]["low"] for n in names]),
        hovertext=[f"{imp[n]['group']}, {imp[n]['n_trials']} trials" for n in names]))
    fig.update_layout(title=title, xaxis_title="importance (normalised)", height=120 + 36 * len(names),
                      margin=dict(l=10, r=10, t=40, b=40))
    return fig


def _robustness_figure(report: dict):
    import plotly.graph_objects as go

    rob = report["robustness"]
    ids = list(rob)
    fig = go.Figure(go.Bar(
        x=ids, y=[rob[c]["mean"] for c in ids], error_y=dict(type="data", array=[rob[c]["std"] or 0 for c in ids]),
        marker_color=["#1a7f37" if c == report["winner"] else "#8c959f" for c in ids],
        hovertext=[_config_label(rob[c]["params"]) for c in ids]))
    for c in ids:
        fig.add_trace(go.Scatter(x=[c] * len(rob[c]["seeds"]), y=rob[c]["seeds"], mode="markers",
                                 marker=dict(color="#1f2328", size=7), showlegend=False))
    fig.update_layout(title="re-trained with fresh seeds: mean ± std (dots: seeds)", yaxis_title=report["objectives"][0]["metric"],
                      showlegend=False, height=380, margin=dict(l=10, r=10, t=40, b=40))
    return fig


ARM_COLOURS = {"baseline": "#8250df", "ssa": "#1a7f37"}


def _front_data(study: optuna.Study, spec) -> dict:
    from .selection import pareto_front

    objectives, directions = [o.metric for o in spec.objectives], [o.direction for o in spec.objectives]
    rows = st.rows(study, objectives)

    def front(members: list[dict]) -> list[int]:
        return sorted(r["number"] for r in pareto_front(members, objectives, directions))

    on_front = set(front(rows))
    return {"objectives": objectives, "directions": directions,
            "trials": [{"number": r["number"], "arm": r["arm"], "values": [r["metrics"][o] for o in objectives],
                        "on_front": r["number"] in on_front} for r in rows],
            "front_by_arm": {arm: front([r for r in rows if r["arm"] == arm]) for arm in spec.arms}}


def _front_figure(data: dict, arms):
    """The first two objectives (`report["pareto"]`): every complete trial by arm, each arm's own front as a
    line, the study's front filled, dominated trials hollow."""
    import plotly.graph_objects as go

    x_name, y_name = data["objectives"][:2]
    fig = go.Figure()
    for arm in arms:
        mine = [t for t in data["trials"] if t["arm"] == arm]
        colour = ARM_COLOURS.get(arm, "#0969da")
        fig.add_trace(go.Scatter(
            x=[t["values"][0] for t in mine], y=[t["values"][1] for t in mine], mode="markers", name=f"{arm} trials",
            marker=dict(color=colour, size=10, symbol=["circle" if t["on_front"] else "circle-open" for t in mine]),
            hovertext=[f"trial {t['number']} ({arm}){' on the front' if t['on_front'] else ', dominated'}"
                       for t in mine]))
        members = sorted((t for t in mine if t["number"] in data["front_by_arm"][arm]), key=lambda t: t["values"][0])
        if members:
            fig.add_trace(go.Scatter(x=[t["values"][0] for t in members], y=[t["values"][1] for t in members],
                                     mode="lines", line=dict(color=colour, dash="dot", shape="hv"),
                                     name=f"{arm} front"))
    fig.update_layout(title="Pareto front: filled = on the study's front, hollow = dominated; dotted = each arm's "
                      "own front", xaxis_title=f"{x_name} ({data['directions'][0]})",
                      yaxis_title=f"{y_name} ({data['directions'][1]})", height=460,
                      margin=dict(l=10, r=10, t=50, b=40))
    return fig


def _div(fig, cls: str = "plot") -> str:
    return f'<div class="{cls}">{fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})}</div>'


def _search_figures(study: optuna.Study, spec, imps, report: dict) -> list[str]:
    from optuna import visualization as vis

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figs = []
    if len(spec.objectives) > 1:
        if len(done) >= 1:
            figs.append(_div(_front_figure(report["pareto"], spec.arms), "plot wide"))
        return figs
    figs.append(_div(vis.plot_optimization_history(study, target_name=spec.objectives[0].metric)))
    if any(t.intermediate_values for t in study.trials):
        figs.append(_div(vis.plot_intermediate_values(study)))
    imp = imps.get(spec.objectives[0].metric, {}).get("fanova", {})
    for a, b in analyse.top_pairs(imp, 2):
        try:
            figs.append(_div(vis.plot_contour(study, params=[a, b], target_name=spec.objectives[0].metric)))
        except Exception:
            pass
    if imp:
        figs.append(_div(vis.plot_slice(study, params=list(imp)[:4], target_name=spec.objectives[0].metric), "plot wide"))
    if len(done) >= 2:
        figs.append(_div(vis.plot_parallel_coordinate(study, target_name=spec.objectives[0].metric), "plot wide"))
    return figs


def _pngs(study: optuna.Study, report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    metric = report["objectives"][0]["metric"]
    imp = report["importances"].get(metric, {})
    if imp:
        names = list(imp)[::-1]
        fig, ax = plt.subplots(figsize=(7, 1 + 0.45 * len(names)))
        means = [imp[n]["mean"] for n in names]
        err = [[imp[n]["mean"] - imp[n]["low"] for n in names], [imp[n]["high"] - imp[n]["mean"] for n in names]]
        ax.barh(names, means, xerr=err, color="#0969da", capsize=3)
        ax.set_xlabel(f"fANOVA importance (mean, 90 % interval over {report['importance_resamples']} bootstrap resamples)")
        ax.set_title(f"Which settings matter for {metric}")
        fig.tight_layout()
        fig.savefig(out_dir / "importances.png", dpi=110)
        plt.close(fig)
        files.append("importances.png")
    if report["robustness"]:
        rob = report["robustness"]
        ids = list(rob)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        # a configuration none of whose seeds finished (every seed diverged) has no mean: no bar, a note
        means = [float("nan") if rob[c]["mean"] is None else rob[c]["mean"] for c in ids]
        ax.bar(ids, means, yerr=[rob[c]["std"] or 0 for c in ids], capsize=4,
               color=["#1a7f37" if c == report["winner"] else "#8c959f" for c in ids])
        for c in ids:
            done = [v for v in rob[c]["seeds"] if v is not None]
            ax.plot([c] * len(done), done, "k.", ms=6)
            if not done:
                ax.annotate("no seed\nfinished", (c, 0.5), xycoords=("data", "axes fraction"), ha="center",
                            fontsize=8, color="#cf222e")
        ax.set_ylabel(metric)
        ax.set_title("Robustness: each config on fresh training seeds, mean ± std (dots: seeds)")
        fig.tight_layout()
        fig.savefig(out_dir / "robustness.png", dpi=110)
        plt.close(fig)
        files.append("robustness.png")
    if report.get("pareto") and report["pareto"]["trials"]:
        p = report["pareto"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm in {t["arm"] for t in p["trials"]}:
            mine = [t for t in p["trials"] if t["arm"] == arm]
            colour = ARM_COLOURS.get(arm, "#0969da")
            for t in mine:
                ax.plot(t["values"][0], t["values"][1], "o", color=colour, mfc=colour if t["on_front"] else "none")
            members = sorted((t for t in mine if t["number"] in p["front_by_arm"].get(arm, [])),
                             key=lambda t: t["values"][0])
            ax.step([t["values"][0] for t in members], [t["values"][1] for t in members], where="post",
                    color=colour, ls=":", label=f"{arm} front")
        ax.set_xlabel(p["objectives"][0])
        ax.set_ylabel(p["objectives"][1])
        ax.set_title("Pareto front (filled: on the study's front; hollow: dominated)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "front.png", dpi=110)
        plt.close(fig)
        files.append("front.png")
    if len(study.directions) == 1 and any(t.state == TrialState.COMPLETE for t in study.trials):
        from optuna.visualization.matplotlib import plot_optimization_history

        ax = plot_optimization_history(study, target_name=metric)
        ax.figure.set_size_inches(7, 4)
        ax.figure.tight_layout()
        ax.figure.savefig(out_dir / "history.png", dpi=110)
        plt.close(ax.figure)
        files.append("history.png")
    return files


# ------------------------------------------------------------------------------------------------ page


COST_LABELS = {
    "latency_ms_per_token": ("decode ms / token", "greedy decoding with the KV cache, generated tokens only "
                             "(the prompt's prefill not timed)"),
    "peak_mem_mb": ("peak memory MiB", "what the training run added at its peak (CPU: resident memory, the "
                    "kernel's high-water mark reset at the run's start; CUDA: max allocated)"),
    "n_params": ("parameters", "all trainable and frozen parameters of the model"),
    "tokens_per_s": ("training tokens / s", "training throughput of the run (evaluation time excluded)"),
}


def _interval_text(d: dict, eq: bool = False) -> str:
    lo, hi = (d.get("eq_low"), d.get("eq_high")) if eq else (d.get("low"), d.get("high"))
    return "–" if lo is None else f"[{_fmt(lo)}, {_fmt(hi)}]"


def _summary_table(report: dict, v: dict) -> str:
    """The decision-maker's table: quality (both contrasts), convergence, efficiency and stability of the chosen
    SSA configuration vs the best baseline, each with what it was measured on."""
    conf = report.get("confirmation") or {}
    seeds = conf.get("seeds") or []
    values = conf.get("values") or {}
    roles = conf.get("roles") or {}
    where = (f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}) shared by all, not used to choose any configuration"
             if seeds else "")

    def spread(cid):
        vals = [x for x in values.get(cid, []) if x is not None]
        if not vals:
            return "–"
        mean = sum(vals) / len(vals)
        std = (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return f"{_fmt(mean)} ± {_fmt(std, 2)}"

    rows = []
    for name, c in (v.get("contrasts") or {}).items():
        d = c["ssa_minus_baseline"]
        role = "ssa" if name == "deploy" else "ssa_alone"
        label = "quality, deploy" if name == "deploy" else "quality, SSA alone"
        # (_table escapes the plain cells; the decision cell is markup of our own)
        rows.append([f"{label}: {c['metric']}", f"{spread(roles.get(role))} ({roles.get(role)})",
                     spread(roles.get("baseline")),
                     f"<b>{html.escape(c['decision'])}</b> {_fmt(d['diff'])} {_interval_text(d)}",
                     f"{c['what']}; paired by seed, {int(round(100 * d['confidence']))} % repeated interval "
                     f"(group-sequential, {len(c['looks'])} look(s)) over {where}; margin {c['margin_text']}; "
                     f"failed seeds SSA {c['failed']['ssa']}, baseline {c['failed']['baseline']}"])
    conv = v.get("convergence") or {}
    if conv.get("ratio") is not None:
        interval = "–" if conv.get("low") is None else f"[×{_fmt(conv['low'], 3)}, ×{_fmt(conv['high'], 3)}]"
        cens = f"; SSA never reached it on {conv['censored']} seed(s) (counted at its whole budget: a lower bound)" \
            if conv.get("censored") else ""
        bound = "≥ " if conv.get("censored") else ""
        rows.append(["convergence: tokens to the baseline's final value", "", "",
                     f"{bound}× {_fmt(conv['ratio'], 3)} {interval}",
                     f"{conv['what']}; {int(round(100 * conv['confidence']))} % t interval over {conv['n']} "
                     f"seeds{cens}"])
    for key, c in (v.get("costs") or {}).items():
        label, what = COST_LABELS.get(key, (key, ""))
        tol = (v.get("recommendation") or {}).get("max_cost", {}).get(key)
        rows.append([f"efficiency: {label}", f"{_fmt(c['ssa'])} ± {_fmt(c.get('ssa_std'), 2)}",
                     f"{_fmt(c['baseline'])} ± {_fmt(c.get('baseline_std'), 2)}",
                     f"× {_fmt(c.get('ratio'), 3)}" + (f" (tolerance ×{_fmt(tol, 3)})" if tol else ""),
                     f"{what}; mean ± std over the deploy contrast's runs"])
    rows.append(["stability", "± is the std over seeds", "", "",
                 "each configuration re-trained with its own seeds; the robustness table below has every seed"])
    head = ["", "SSA", f"baseline ({roles.get('baseline') or '–'})", "decision, SSA − baseline / SSA ÷ baseline",
            "measured on"]
    return _table(head, rows)


def _verdict_html(report: dict) -> tuple[str, str]:
    """The first screen's answer: the recommendation, each contrast's decision line, the table."""
    v = report["verdict"]
    if v is None:
        return "<p>No finished runs of both SSA and the baseline yet.</p>", "unclear"
    decision = v.get("decision", "undecided")
    vclass = {"helps": "helps", "hurts": "hurts", "equivalent": "equivalent"}.get(decision, "unclear")
    rec = (v.get("recommendation") or {}).get("text")
    out = f'<p class="big">{html.escape(rec or v["answer"])}</p>'
    contrasts = v.get("contrasts") or {}
    if contrasts:
        out += "<ul>" + "".join(f"<li><b>{'deploy' if n == 'deploy' else 'SSA alone'}</b> "
                                f"({html.escape(c['what'])}): {html.escape(c['answer'])}</li>"
                                for n, c in contrasts.items()) + "</ul>"
    else:
        out += f"<p>{html.escape(v['answer'])}</p>"
    if report.get("confirmation"):
        out += _summary_table(report, v)
    return out, vclass


def _html(study: optuna.Study, spec, report: dict, imps: dict) -> str:
    import plotly.offline

    from . import __version__

    dash = resources.files("dashboards")
    metric = report["objectives"][0]["metric"]
    verdict_html, vclass = _verdict_html(report)
    winner = report["winner"]
    rob = report["robustness"]
    if winner and rob and winner in rob:
        winner_html = (f'<p class="big">{html.escape(winner)}</p><p>{html.escape(_config_label(rob[winner]["params"]))}</p>'
                       f'<p>{metric} {_fmt(rob[winner]["mean"])} ± {_fmt(rob[winner]["std"])} over {len(rob[winner]["seeds"])} '
                       f'fresh seeds; chosen by {html.escape(report["winner_selected_by"])}.</p>')
    elif report.get("pareto"):
        n = sum(t["on_front"] for t in report["pareto"]["trials"])
        winner_html = (f'<p class="big">a front of {n} trial(s)</p><p>Several objectives: no single best. Choose with '
                       '<code>ssa-tune export STUDY --where "METRIC &lt;= X" --pick METRIC</code>, or a '
                       '<code>select:</code> section in the spec (the robustness stage then re-trains the front '
                       'members it allows).</p>')
    elif report["best_trial"]:
        b = report["best_trial"]
        winner_html = (f'<p class="big">trial-{b["number"]}</p><p>{html.escape(_config_label(b["params"]))}</p>'
                       f'<p>{metric} {_fmt(b["values"][0])} (one seed; no robustness stage ran).</p>')
    else:
        winner_html = "<p>No complete trial yet.</p>"
    arm_rows = [[arm, a["trials"]["complete"], a["trials"]["pruned"], a["trials"]["failed"],
                 f"#{a['best']['number']}: {_fmt(a['best']['values'][0])}" if a["best"] else "–"]
                for arm, a in report["arms"].items()]
    winner_html += "<p>The arms of the search, each tuned on its own share of the budget:</p>" + \
        _table(["arm", "complete", "pruned", "failed", f"best {metric} (one seed)"], arm_rows)
    lc = report["long_context"]
    if lc and lc.get("values"):
        flagged = [c for c, f in lc["flagged"].items() if f]
        rows = [[c, sum(x for x in vals if x is not None) / max(1, len([x for x in vals if x is not None])),
                 "below baseline" if lc["flagged"].get(c) else "ok"] for c, vals in lc["values"].items()]
        guard_html = _table(["config", f"mean {lc['metric']}", "guard"], rows,
                            ["flag" if lc["flagged"].get(r[0]) else "" for r in rows])
        if lc.get("unchecked"):
            guard_html += f'<p class="verdict unclear">The long-range guard was {html.escape(lc["unchecked"])}.</p>'
        else:
            guard_html += ("<p>Flagged configurations are not exported (constraint on).</p>" if lc["constraint"] and flagged
                           else "<p>No configuration falls below the baseline.</p>" if not flagged
                           else "<p>Flagged, but the constraint is off: the winner may still be one of them.</p>")
    else:
        guard_html = "<p>No long-context probe ran (add <code>robustness.long_context</code>, e.g. a passkey dataset).</p>"
    imp_parts = []
    for m, by_eval in imps.items():
        for ev, imp in by_eval.items():
            if imp:
                imp_parts.append(_div(_importance_figure(imp, f"{m}: {'fANOVA' if ev == 'fanova' else 'PED-ANOVA'}")))
    importance_html = (f'<div class="plots">{"".join(imp_parts)}</div>' if imp_parts else
                       "<p>Too few complete trials for importances (at least 4 are needed).</p>")
    if imps.get(metric, {}).get("fanova"):
        first = imps[metric]["fanova"]
        importance_html += _table(["parameter", "mean", "90% low", "90% high", "estimated on (complete trials)"],
                                  [[p, x["mean"], x["low"], x["high"], f"{x['group']} ({x['n_trials']})"] for p, x in first.items()])
    if rob:
        rows = [[c, r.get("arm") or "", _config_label(r["params"]), r["mean"], r["std"], r["failed"], r["score"], r["rank"]]
                for c, r in rob.items()]
        robustness_html = _table(["config", "arm", "settings", f"mean {metric}", "std", "failed seeds", "robust score",
                                  "rank"], rows, ["win" if r[0] == winner else "" for r in rows])
        seeds = report.get("robustness_seeds") or []
        robustness_html += (f"<p>Each configuration re-trained on training seeds {', '.join(map(str, seeds))}, all scored "
                            "on the study's own validation data; a failed seed counts as the worst value any "
                            "configuration reached.</p>")
        tau = report["rank_stability_kendall_tau"]
        robustness_html += f"<p>Rank stability between seeds (mean Kendall τ): <b>{_fmt(tau, 3)}</b> (1 = same order on every seed).</p>"
        robustness_html += f'<div class="plots">{_div(_robustness_figure(report), "plot wide")}</div>'
    else:
        robustness_html = "<p>No robustness stage ran: add a <code>robustness:</code> section or run <code>ssa-tune robustness STUDY</code>.</p>"
    c = report["trials"]
    objectives = ", ".join(f"{html.escape(o['metric'])} ({o['direction']})" for o in report["objectives"])
    meta = (f"dataset <code>{html.escape(json.dumps(report['dataset']))}</code> · "
            f"objective{'s' if len(report['objectives']) > 1 else ''} {objectives} · "
            f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed")
    return Template(dash.joinpath("report.html").read_text()).substitute(
        study=html.escape(study.study_name), css=dash.joinpath("report.css").read_text(),
        plotlyjs=plotly.offline.get_plotlyjs(), meta=meta, verdict_class=vclass, verdict_html=verdict_html,
        winner_html=winner_html, guard_html=guard_html, importance_html=importance_html,
        robustness_html=robustness_html, resamples=report["importance_resamples"],
        search_html=f'<div class="plots">{"".join(_search_figures(study, spec, imps, report))}</div>',
        version=__version__, generated=report["generated"])


def log_to_mlflow(study: optuna.Study, target: Target, out_dir: Path, report: dict) -> str | None:
    """Attach the report to the study's parent run, and the headline numbers as its metrics; returns where the
    run is in the MLflow UI (for a tracking server)."""
    from .track import Tracker, experiment_url

    parent = study.user_attrs.get(st.ATTR_PARENT_RUN)
    if not parent:
        return None
    tracker = Tracker(target.tracking, study.study_name, target.workdir / "mlartifacts")
    tracker.client.log_artifacts(parent, str(out_dir), artifact_path="report")
    metrics = {}
    for m, imp in report["importances"].items():
        for p, x in imp.items():
            metrics[f"importance.{m}.{p}"] = x["mean"]
    v = report.get("verdict")
    if v and v["ssa_minus_baseline"]["diff"] is not None:
        metrics["verdict.ssa_minus_baseline"] = v["ssa_minus_baseline"]["diff"]
    tags = {"ssa_tune.verdict": v["answer"] if v else "undecided", "ssa_tune.winner": str(report["winner"]),
            "ssa_tune.decision": (v or {}).get("decision", "undecided")}
    if v and v.get("recommendation"):
        tags["ssa_tune.recommendation"] = v["recommendation"]["text"]
    if v and (v.get("contrasts") or {}).get("ssa_alone"):
        tags["ssa_tune.decision_ssa_alone"] = v["contrasts"]["ssa_alone"]["decision"]
    if v and (v.get("convergence") or {}).get("ratio") is not None:
        metrics["verdict.convergence_ratio"] = v["convergence"]["ratio"]
    tracker.log_study(parent, metrics=metrics, tags=tags)
    url = experiment_url(target.tracking, tracker.experiment_id)
    return f"{url.removesuffix('/runs')}/runs/{parent}" if url else None
