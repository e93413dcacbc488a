"""The tuning service end to end: its fixed costs, and search efficiency as a user feels it.

(a) overhead     benchmarks/tuning_task.yaml, 12 trials (random sampler, no early stopping, so both slots stay
                 busy and idle time is the service's), run with `ssa_tune.driver.run_study` in this process
                 (Ray already started). ratio = study wall x concurrency / sum of the trials' own `seconds`
                 (each trial's whole train/eval loop as it measured it); 1.00 = no overhead. Also with the
                 process's one `ray.init` counted. Target <= 1.20.
(a') handover    the overhead study again, timed on both sides of Ray Tune's hand-over: per worker slot, from
                 one trial's end of training to the next trial's start of training, split into the last report
                 reaching the driver, the trial's completion, the searcher's next suggestion, Tune starting the
                 trial, the worker entering the trainable, the trial's set-up before its model (spec, dataset),
                 and the model and optimizer (setup_seconds); medians, and the mean slot time lost (target
                 <= 0.3 s a trial).
(b) quickstart   `ssa-tune run search_spaces/quickstart.yaml` as a user runs it (a fresh process, a fresh work
                 dir): ratio = wall / (sum of `seconds` of every trial and robustness run / max_concurrent),
                 target <= 1.15; and where the rest of the wall time goes, from the time each line of the
                 command's own output appeared: start-up to the study line, to the first trial's first
                 evaluation, the search, the robustness stage, the report.
(c) efficiency   the same task, for each sampler seed: TPE + ASHA (the spec as written), TPE without early
                 stopping, random search without early stopping, the same budget of trials each. For each
                 study, the anytime curve: the best val_loss reached among COMPLETE trials as a function of
                 the training steps spent so far (trials in the order they ended; a trial spends the steps it
                 ran: all of them, or up to where it was stopped). Summary: the steps TPE + ASHA needs to match
                 random search's final best, as a ratio random total / TPE + ASHA steps-to-match (goal >= 3),
                 its median and range over seeds; the same for TPE alone; a PNG of the curves.

Prints ONE JSON object on stdout (progress on stderr); --out writes it, --png the curves.

    python benchmarks/tuning.py [--quick] [--out FILE] [--png FILE] [--seeds 0 1 2 3 4] [--trials N]
                                [--parts overhead handover quickstart efficiency]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "benchmarks" / "tuning_task.yaml"
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
FULL = {"overhead_trials": 12, "seeds": [0, 1, 2, 3, 4], "trials": 24, "quickstart": [], "efficiency": []}
# --quick: the efficiency studies one trial at a time (steps, not slots, are what that part counts; each slot is
# a Ray worker process, ~5 CPU-s to start)
QUICK = {"overhead_trials": 4, "seeds": [0], "trials": 6, "efficiency": ["resources.max_concurrent=1"],
         "quickstart": ["--trials", "4", "--set", "train.max_steps=60", "--set", "train.eval_every=20",
                        "--set", "scheduler.grace_steps=20", "--set", "robustness.seeds=2",
                        "--set", "robustness.top_k=1"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mlflow_seconds(tracking: str, experiment: str) -> dict[str, float]:
    """MLflow run name -> the last `seconds` the run reported (its own train/eval wall time)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    return {r.info.run_name: r.data.metrics["seconds"] for r in runs if "seconds" in r.data.metrics}


def executed_steps(t) -> int:
    """Training steps a trial ran: to its end, or up to where it was stopped."""
    if not t.intermediate_values:
        return 0
    return int(t.user_attrs.get("ssa_tune.pruned_at_step", max(t.intermediate_values)))


def anytime(study) -> list[tuple[int, float | None]]:
    """[(steps spent so far, best COMPLETE val_loss so far)] in the order trials ended."""
    from optuna.trial import TrialState

    done = sorted((t for t in study.trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    spent, best, curve = 0, None, []
    for t in done:
        spent += executed_steps(t)
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            best = t.value if best is None else min(best, t.value)
        curve.append((spent, best))
    return curve


def steps_to_reach(curve, target: float) -> int | None:
    return next((s for s, b in curve if b is not None and b <= target), None)


# ----------------------------------------------------------------------------------------------- studies


class Bench:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="ssa-tune-bench-"))

    def start_ray(self) -> float:
        from ssa_tune.tune.cluster import init_ray

        t0 = time.perf_counter()
        init_ray(None)
        return time.perf_counter() - t0

    def study(self, name: str, overrides: list[str]):
        from ssa_tune import study as st
        from ssa_tune.driver import resolve_target, run_study
        from ssa_tune.spec import load_spec

        spec = load_spec(SPEC, overrides)
        target = resolve_target(None, None, str(self.root / name), None, None, name)
        t0 = time.perf_counter()
        run_study(spec, target, out=lambda s: None, robustness="never")
        wall = time.perf_counter() - t0
        return spec, st.load_study(st.open_storage(target.storage, create=False), name), target, wall


def overhead(bench: Bench, n_trials: int, ray_init_s: float) -> dict:
    spec, study, target, wall = bench.study("overhead", ["sampler.kind=random", "scheduler.kind=none",
                                                          f"budget.n_trials={n_trials}"])
    seconds = _mlflow_seconds(target.tracking, "overhead")
    trial_s = sum(v for k, v in seconds.items() if k.startswith("trial-"))
    conc = int(spec.resources["max_concurrent"])
    return {"trials": n_trials, "concurrency": conc, "study_wall_s": wall, "sum_trial_seconds": trial_s,
            "ratio": wall * conc / trial_s, "ratio_with_ray_init": (wall + ray_init_s) * conc / trial_s,
            "per_trial_overhead_s": (wall * conc - trial_s) / n_trials, "target": 1.20}


class _Clock:
    """Driver-side timestamps (time.time(), comparable with the workers' on one machine) of each Tune trial:
    when the searcher was asked for it, when Tune started it, when its results and its end reached the driver."""

    def __init__(self):
        self.events: dict[str, dict[str, float]] = {}
        self.results: dict[str, list[tuple[float, dict]]] = {}

    def mark(self, trial_id: str, what: str) -> None:
        self.events.setdefault(trial_id, {}).setdefault(what, time.time())

    def install(self):
        """Wrap ssa_tune.tune's searcher and progress callback (driver side only; workers are untouched)."""
        from ssa_tune.tune import progress, searcher

        clock, base_searcher, base_progress = self, searcher.StudySearch, progress.Progress

        class Timed(base_searcher):
            def suggest(self, trial_id):
                out = super().suggest(trial_id)
                if isinstance(out, dict):
                    clock.mark(trial_id, "suggested")
                return out

            def on_trial_complete(self, trial_id, result=None, error=False):
                clock.mark(trial_id, "complete")
                return super().on_trial_complete(trial_id, result, error)

        class TimedProgress(base_progress):
            def on_trial_start(self, iteration, trials, trial, **info):
                clock.mark(trial.trial_id, "started")
                return super().on_trial_start(iteration, trials, trial, **info)

            def on_trial_result(self, iteration, trials, trial, result, **info):  # Tune passes keywords
                clock.results.setdefault(trial.trial_id, []).append((time.time(), dict(result)))
                return super().on_trial_result(iteration, trials, trial, result, **info)

        searcher.StudySearch, progress.Progress = Timed, TimedProgress
        return lambda: (setattr(searcher, "StudySearch", base_searcher), setattr(progress, "Progress", base_progress))


def handover(bench: Bench, n_trials: int) -> dict:
    """Where a worker slot's time goes between one trial's training and the next's, from timestamps on both
    sides: the worker adds when it entered the trainable and when it made each report (ssa_tune.entered /
    ssa_tune.wall), its setup outside `seconds` (setup_seconds); the driver marks the rest (_Clock)."""
    from ssa_tune.tune.trainable import ENTERED_KEY, WALL_KEY

    clock = _Clock()
    undo = clock.install()
    began = time.time()
    try:
        spec, study, target, wall = bench.study("handover", ["sampler.kind=random", "scheduler.kind=none",
                                                             f"budget.n_trials={n_trials}"])
    finally:
        undo()
    ended = time.time()
    trials = []
    for tid, results in clock.results.items():
        res = [r for _, r in results if r.get("step") is not None]
        if not res:
            continue
        last, first = res[-1], res[0]
        ev = clock.events.get(tid, {})
        t_start = first[WALL_KEY] - first["seconds"]  # the training loop's clock started here
        trials.append({"id": tid, "pid": last.get("pid"), "suggested": ev.get("suggested"),
                       "started": ev.get("started"), "entered": last[ENTERED_KEY], "t_start": t_start,
                       "setup_s": last["setup_seconds"], "train_end": t_start + last["seconds"],
                       "last_report": last[WALL_KEY], "last_seen": results[-1][0], "complete": ev.get("complete"),
                       "seconds": last["seconds"]})
    parts: dict[str, list[float]] = {k: [] for k in (
        "last report -> driver has it", "driver has it -> trial complete", "complete -> next suggested",
        "suggested -> Tune starts it", "Tune starts it -> worker enters the trainable",
        "entered -> setup (spec, dataset, imports)", "setup: model, optimizer (setup_seconds)", "slot lost")}
    by_pid: dict = {}
    for t in sorted(trials, key=lambda t: t["entered"]):
        by_pid.setdefault(t["pid"], []).append(t)
    for seq in by_pid.values():
        for a, b in zip(seq, seq[1:]):
            if None in (a["complete"], b["suggested"], b["started"]):
                continue
            parts["last report -> driver has it"].append(a["last_seen"] - a["last_report"])
            parts["driver has it -> trial complete"].append(a["complete"] - a["last_seen"])
            parts["complete -> next suggested"].append(b["suggested"] - a["complete"])
            parts["suggested -> Tune starts it"].append(b["started"] - b["suggested"])
            parts["Tune starts it -> worker enters the trainable"].append(b["entered"] - b["started"])
            parts["entered -> setup (spec, dataset, imports)"].append(b["t_start"] - b["setup_s"] - b["entered"])
            parts["setup: model, optimizer (setup_seconds)"].append(b["setup_s"])
            parts["slot lost"].append(b["t_start"] - a["train_end"])
    med = {k: round(statistics.median(v), 4) if v else None for k, v in parts.items()}
    mean = {k: round(statistics.mean(v), 4) if v else None for k, v in parts.items()}
    trial_s = sum(t["seconds"] for t in trials)
    conc = int(spec.resources["max_concurrent"])
    return {"trials": len(trials), "hand_overs": len(parts["slot lost"]), "median_s": med, "mean_s": mean,
            # the study's ends: the driver's set-up before the first suggestion, the first trial's wait for a
            # worker (process start, imports, its set-up), and what follows the last trial's training
            "driver_setup_s": round(min(t["suggested"] for t in trials if t["suggested"]) - began, 3),
            "first_start_s": round(min(t["t_start"] for t in trials) - min(
                t["suggested"] for t in trials if t["suggested"]), 3) if trials else None,
            # of which: until a worker process entered the trainable (its start, imports, Tune's actor set-up),
            # and that first trial's own set-up (spec, dataset built, model, optimizer)
            "first_enter_s": round(min(t["entered"] for t in trials) - min(
                t["suggested"] for t in trials if t["suggested"]), 3) if trials else None,
            "after_last_trial_s": round(ended - max(t["train_end"] for t in trials), 3),
            "study_wall_s": wall, "ratio": wall * conc / trial_s if trial_s else None, "target_per_trial_s": 0.3}


def quickstart(extra: list[str]) -> dict:
    """The quickstart as a user runs it; ratio and where the time outside training goes."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ssa_tune", "run", str(QUICKSTART), "--workdir", f"{tmp}/wd", *extra]
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        patterns = {"study_line": r"^study quickstart: \d+/", "first_eval": r"^\s+running ",
                    "robustness_start": r"^robustness: \d+ configs", "robustness_end": r"^robust winner|^verdict",
                    "report": r"^report: "}
        for line in proc.stdout:
            now = time.perf_counter() - t0
            for key, pat in patterns.items():
                if key not in marks and re.search(pat, line):
                    marks[key] = now
        proc.wait()
        wall = time.perf_counter() - t0
        assert proc.returncode == 0, "the quickstart failed"
        seconds = _mlflow_seconds(f"sqlite:///{tmp}/wd/mlflow.db", "quickstart")
    trial_s = sum(v for k, v in seconds.items() if k.startswith("trial-"))
    robust_s = sum(v for k, v in seconds.items() if k.startswith("robust-"))
    conc = 2
    work = (trial_s + robust_s) / conc
    phases = {
        "start_to_study_line_s": marks.get("study_line"),
        "study_line_to_first_evaluation_s": _diff(marks, "first_eval", "study_line"),
        "search_s": _diff(marks, "robustness_start", "study_line"),
        "robustness_s": _diff(marks, "robustness_end", "robustness_start"),
        "report_s": _diff(marks, "report", "robustness_end"),
        "after_report_s": None if "report" not in marks else wall - marks["report"],
    }
    return {"command": " ".join(["ssa-tune run search_spaces/quickstart.yaml", *extra]), "wall_s": wall,
            "runs": len(seconds), "sum_trial_seconds": trial_s, "sum_robustness_seconds": robust_s,
            "ratio": wall / work, "target": 1.15, "phases": phases,
            "outside_training_s": wall - work}


def _diff(marks, a, b):
    return marks[a] - marks[b] if a in marks and b in marks else None


def efficiency(bench: Bench, seeds: list[int], n_trials: int, extra: Sequence[str] = ()) -> dict:
    strategies = {"tpe_asha": [], "tpe": ["scheduler.kind=none"], "random": ["sampler.kind=random", "scheduler.kind=none"]}
    per_seed = {}
    for seed in seeds:
        row = {}
        for name, over in strategies.items():
            sid = f"eff-{name}-s{seed}"
            _, study, _, wall = bench.study(sid, [*over, *extra, f"sampler.seed={seed}", f"budget.n_trials={n_trials}"])
            curve = anytime(study)
            row[name] = {"curve": curve, "final_best": curve[-1][1] if curve else None,
                         "total_steps": curve[-1][0] if curve else 0, "wall_s": wall}
            log(f"  seed {seed} {name:<9} best {row[name]['final_best']} after {row[name]['total_steps']} steps")
        goal = row["random"]["final_best"]
        for name in ("tpe_asha", "tpe"):
            s = steps_to_reach(row[name]["curve"], goal) if goal is not None else None
            row[name]["steps_to_match_random"] = s
            row[name]["ratio"] = row["random"]["total_steps"] / s if s else None
            row[name]["reached"] = s is not None
        per_seed[str(seed)] = row

    def summary(name):
        ratios = [r[name]["ratio"] for r in per_seed.values()]
        got = [x for x in ratios if x is not None]
        return {"per_seed": ratios, "median": statistics.median(got) if got else None,
                "min": min(got) if got else None, "max": max(got) if got else None,
                "not_reached": sum(x is None for x in ratios)}

    return {"trials_per_study": n_trials, "seeds": seeds, "tpe_asha_vs_random": summary("tpe_asha"),
            "tpe_vs_random": summary("tpe"), "goal": 3.0, "studies": per_seed}


def plot(eff: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"tpe_asha": "#1a7f37", "tpe": "#0969da", "random": "#8c959f"}
    labels = {"tpe_asha": "TPE + ASHA", "tpe": "TPE, no early stopping", "random": "random search, no early stopping"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for seed, row in eff["studies"].items():
        for name, r in row.items():
            pts = [(s, b) for s, b in r["curve"] if b is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.step(xs, ys, where="post", color=colours[name], alpha=0.8, lw=1.2,
                        label=labels[name] if seed == next(iter(eff["studies"])) else None)
    ax.set_xlabel("training steps spent (all trials, in the order they ended)")
    ax.set_ylabel("best val_loss so far (complete trials)")
    s = eff["tpe_asha_vs_random"]
    ax.set_title(f"Anytime best, {len(eff['seeds'])} sampler seeds\nTPE + ASHA matches random search's final best "
                 f"with 1/{s['median']:.2g} of its compute (median)" if s["median"] else "Anytime best", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every part at toy sizes")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--seeds", type=int, nargs="*")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--parts", nargs="*", default=["overhead", "quickstart", "efficiency"])
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    bench = Bench()
    result: dict = {"benchmark": "tuning", "quick": args.quick, "platform": platform.platform(),
                    "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    try:
        if "quickstart" in args.parts:  # first: its own process, before this one holds a Ray instance
            log("quickstart ...")
            result["quickstart"] = quickstart(cfg["quickstart"])
        ray_s = bench.start_ray()
        result["ray_init_s"] = ray_s
        if "overhead" in args.parts:
            log("overhead ...")
            result["overhead"] = overhead(bench, cfg["overhead_trials"], ray_s)
        if "handover" in args.parts:
            log("handover ...")
            result["handover"] = handover(bench, cfg["overhead_trials"])
        if "efficiency" in args.parts:
            log("efficiency ...")
            result["efficiency"] = efficiency(bench, args.seeds or cfg["seeds"], args.trials or cfg["trials"],
                                              cfg["efficiency"])
            if args.png:
                plot(result["efficiency"], args.png)
                result["png"] = str(args.png)
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
