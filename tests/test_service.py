"""The tuning service end to end, with a real Ray, a real Optuna storage and a real MLflow store."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from .conftest import ROOT, SSA_TUNE, TINY, deep_update, run_here
from .services import kill_group, wait_for

pytestmark = pytest.mark.slow


def _study(workdir, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")


def _runs(workdir, name="tiny"):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_quickstart_study_end_to_end(write_spec, tmp_path):
    spec = write_spec({"resources": {"max_concurrent": 2}})  # two trials at a time, as a user's study runs
    wd = tmp_path / "wd"
    proc = run_here("run", spec, "--workdir", wd, "--json")
    summary = json.loads(proc.stdout)
    assert summary["study"] == "tiny"
    c = summary["trials"]
    assert c["complete"] + c["pruned"] == 4 and c["running"] == 0 and c["waiting"] == 0
    assert "sqlite" in summary["storage"]
    study = _study(wd)
    # the baseline is the enqueued first trial
    assert study.trials[0].params["ssa.enabled"] is False

    # MLflow: one parent run per study, one nested child run per trial, states mirroring Optuna
    client, runs = _runs(wd)
    parents = [r for r in runs if r.data.tags.get("ssa_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("ssa_tune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(children) == len(study.trials)
    by_number = {int(r.data.tags["ssa_tune.trial_number"]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.trials]  # none lost, none twice
    for t in study.trials:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["ssa_tune.state"] == t.state.name
        assert run.data.params["train.lr"] == str(t.params["train.lr"])
        assert run.data.params["ssa.enabled"] == str(t.params["ssa.enabled"])
        if t.params["ssa.enabled"]:  # every SSA knob is a param
            for knob in ("query_position", "query_gate", "value_gate", "token_scale", "per_head", "layers"):
                assert f"ssa.{knob}" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_loss")
        steps = sorted(m.step for m in history)
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert steps == [20, 40]
            last = max(history, key=lambda m: m.step).value
            assert last == pytest.approx(t.value)
            assert run.info.status == "FINISHED"
        else:
            assert t.state == optuna.trial.TrialState.PRUNED
            assert steps == [20] and run.data.tags["ssa_tune.pruned_at_step"] == "20"
    assert parent.data.metrics["trials_complete"] == c["complete"]

    # status / best / studies / export read the study back
    status = json.loads(run_here("status", "tiny", "--workdir", wd, "--json").stdout)
    assert set(status) >= {"study", "storage", "tracking_uri", "trials", "best"}
    assert status["best"]["value"] == pytest.approx(study.best_value)
    best = json.loads(run_here("best", "tiny", "--workdir", wd, "--json").stdout)
    assert best["number"] == study.best_trial.number and "val_loss" in best["metrics"]
    assert json.loads(run_here("studies", "--workdir", wd, "--json").stdout)[0]["study"] == "tiny"

    out = tmp_path / "best.yaml"
    run_here("export", "tiny", "-o", out, "--workdir", wd)
    exported = yaml.safe_load(out.read_text())
    assert exported["study"]["trial"] == study.best_trial.number
    assert exported["model"]["d_model"] == 32 and exported["train"]["lr"] == pytest.approx(study.best_params["train.lr"])
    assert exported["source"]["winner"] == ("ssa" if study.best_params["ssa.enabled"] else "baseline")
    # the trial's own metrics only: none of Ray's bookkeeping or its flattened `config/...` copies
    assert "val_loss" in exported["metrics"]
    assert not [k for k in exported["metrics"] if k.startswith("config/") or k in ("time_total_s", "pid")]
    for run in children:
        assert not [k for k in run.data.metrics if k.startswith("config/")], run.data.metrics

    # another project: load_config + convert in a fresh process
    code = (
        "import sys, torch, ssa_tune\n"
        "cfg = ssa_tune.load_config(sys.argv[1])\n"
        "m = ssa_tune.GPT(ssa_tune.GPTConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=16))\n"
        "x = torch.randint(0, 50, (2, 16))\n"
        "before = m(x)[0]\n"
        "ssa_tune.convert(m, cfg)\n"
        "after = m(x)[0]\n"
        "print(type(cfg).__name__, cfg.query_gate, sum(a.temps is not None for a in m.attention_layers), after.shape[-1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, gate, converted, vocab = proc.stdout.split()
    assert name == "SSAConfig" and gate == exported["ssa"]["query_gate"] and int(converted) == 2 and vocab == "50"

    # running the same spec again: the budget is spent, nothing new runs
    again = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    assert again["trials"] == summary["trials"]


def test_failing_trials_are_recorded_and_the_study_goes_on(tmp_path):
    # lr 1e12 diverges; mlp_ratio 10**9 asks the allocator for terabytes
    raw = deep_update(TINY, {"sampler": {"kind": "random", "seed": 3}, "budget": {"n_trials": 3},
                             "baseline": False, "scheduler": {"kind": "none"}, "resources": {"max_concurrent": 1}})
    raw["search"] = {"train.lr": {"type": "categorical", "choices": [0.003, 1.0e+12]},
                     "model.mlp_ratio": {"type": "categorical", "choices": [4, 1000000000]}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    study = _study(wd)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, "the spec is built to make some trials fail"
    reasons = {t.user_attrs["ssa_tune.fail_reason"].split(":")[0] for t in failed}
    assert reasons <= {"diverged", "out of memory"} and reasons
    for t in failed:
        if t.params["model.mlp_ratio"] == 1000000000:
            assert t.user_attrs["ssa_tune.fail_reason"].startswith("out of memory")
        else:
            assert t.user_attrs["ssa_tune.fail_reason"].startswith("diverged")
    # the study went on: healthy trials completed after failures
    assert summary["trials"]["complete"] >= 1
    # ...in the same worker process: a trial that fails as trials do hands its worker to the next trial (a
    # new process costs seconds of imports); one trial at a time here, so one process ran them all
    assert {t.user_attrs["ssa_tune.node"]["pid"] for t in study.trials} == {study.trials[0].user_attrs["ssa_tune.node"]["pid"]}
    assert study.trials[0].user_attrs["ssa_tune.node"]["pid"] > 0
    client, runs = _runs(wd)
    by_number = {int(r.data.tags["ssa_tune.trial_number"]): r for r in runs if r.data.tags.get("ssa_tune.role") == "trial"}
    for t in failed:
        run = by_number[t.number]
        assert run.info.status == "FAILED" and run.data.tags["ssa_tune.state"] == "FAIL"
        assert run.data.tags["ssa_tune.fail_reason"] == t.user_attrs["ssa_tune.fail_reason"]


def test_sigkill_then_resume_finishes_the_budget(write_spec, tmp_path):
    spec = write_spec({"train": {"max_steps": 200, "eval_every": 20}, "budget": {"n_trials": 5},
                       "scheduler": {"kind": "none"}, "resources": {"max_concurrent": 2}})  # killed with two trials running
    wd = tmp_path / "wd"
    proc = subprocess.Popen([*SSA_TUNE, "run", str(spec), "--workdir", str(wd)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # wait until trials are running and at least one has reported, then kill the driver hard
    deadline = time.monotonic() + 240
    killed_running = []
    try:
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if not (wd / "optuna.db").exists():
                continue
            try:
                trials = _study(wd).trials
            except Exception:
                continue
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
            if running:
                killed_running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
                break
        assert killed_running, "no trial was running in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)
    before = _study(wd).trials
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in before)

    summary = json.loads(run_here("resume", "tiny", "--workdir", wd, "--json").stdout)
    study = _study(wd)
    c = summary["trials"]
    assert c["complete"] + c["pruned"] == 5  # the budget counts COMPLETE and PRUNED
    assert c["running"] == 0 and c["waiting"] == 0
    killed = [t for t in study.trials if t.number in killed_running]
    for t in killed:  # interrupted trials are FAIL with the reason, their parameters re-run once
        assert t.state == optuna.trial.TrialState.FAIL
        assert t.user_attrs["ssa_tune.fail_reason"].startswith("killed")
        retries = [r for r in study.trials if r.user_attrs.get("ssa_tune.retry_of") == t.number]
        assert len(retries) == 1 and retries[0].params == t.params
        assert retries[0].state != optuna.trial.TrialState.FAIL
    # none counted twice: each trial number once in MLflow; killed runs closed as KILLED
    client, runs = _runs(wd)
    children = [r for r in runs if r.data.tags.get("ssa_tune.role") == "trial"]
    numbers = [int(r.data.tags["ssa_tune.trial_number"]) for r in children]
    assert sorted(numbers) == [t.number for t in study.trials]
    for r in children:
        assert r.info.status != "RUNNING"
        if int(r.data.tags["ssa_tune.trial_number"]) in killed_running:
            assert r.info.status == "KILLED" and r.data.tags["ssa_tune.state"] == "FAIL"
    parents = [r for r in runs if r.data.tags.get("ssa_tune.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_robustness_stage_report_and_robust_export(write_spec, tmp_path):
    spec = write_spec({"budget": {"n_trials": 4}, "scheduler": {"kind": "none"}, "resources": {"max_concurrent": 2},
                       "robustness": {"top_k": 2, "seeds": 2, "penalty": 1.0, "constraint": True, "confirm_seeds": 2,
                                      "long_context": {"kind": "passkey", "seq_len": 64}}})
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    report_dir = wd / "reports" / "tiny"
    assert summary["report"] == str(report_dir / "report.html")
    rep = json.loads((report_dir / "report.json").read_text())
    # importances: objective -> param -> {mean, low, high}
    assert rep["importance_resamples"] == int(os.environ["SSA_TUNE_IMPORTANCE_RESAMPLES"])  # the setting holds
    imp = rep["importances"]["val_loss"]
    assert imp and all({"mean", "low", "high"} <= set(v) and v["low"] <= v["mean"] <= v["high"] for v in imp.values())
    # robustness: config id -> {mean, std, seeds}; the baseline is always among them
    rob = rep["robustness"]
    assert len(rob) >= 2 and all(len(r["seeds"]) == 2 for r in rob.values())
    assert any(r["params"].get("ssa.enabled") is False for r in rob.values())
    ranked = sorted((r["score"], cid) for cid, r in rob.items() if r["score"] is not None)
    lc = rep["long_context"]
    assert lc["metric"] == "passkey_acc" and set(lc["values"]) == set(rob)
    eligible = [cid for _, cid in ranked if not lc["flagged"].get(cid)]
    assert rep["winner"] == eligible[0]  # best robust score among those the long-range guard lets through
    assert rep["verdict"]["answer"] and "ssa_minus_baseline" in rep["verdict"]
    # the decision: in report.json, the run's JSON summary, both contrasts with their own decisions
    decision = rep["verdict"]["decision"]
    assert decision in ("helps", "hurts", "equivalent", "undecided") and summary["decision"] == decision
    assert rep["verdict"]["answer"].startswith(f"{decision}: val_loss SSA − baseline")
    assert set(rep["verdict"]["contrasts"]) == {"deploy", "ssa_alone"}
    assert rep["verdict"]["recommendation"]["text"] == summary["recommendation"]
    assert rep["verdict"]["convergence"]["n"] >= 1  # tokens to the baseline's final loss, from the runs' curves
    page = (report_dir / "report.html").read_text()
    outside_scripts = re.sub(r"<script>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", outside_scripts)  # nothing loads from a network
    assert "Does SSA help on this dataset?" in page and "Plotly.newPlot" in page
    # all of it is in MLflow: artifacts of the parent run, one child run per robustness training
    client, runs = _runs(wd)
    parent = next(r for r in runs if r.data.tags.get("ssa_tune.role") == "study")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.json", "report/importances.png", "report/robustness.png"} <= names
    assert parent.data.tags["ssa_tune.verdict"] == rep["verdict"]["answer"]
    assert parent.data.tags["ssa_tune.decision"] == decision
    assert parent.data.tags["ssa_tune.recommendation"] == rep["verdict"]["recommendation"]["text"]
    assert html.escape(rep["verdict"]["recommendation"]["text"]) in page and "SSA alone" in page
    robust_runs = [r for r in runs if r.data.tags.get("ssa_tune.role") == "robustness"]
    select = [r for r in robust_runs if r.data.tags["ssa_tune.stage"] == "select"]
    confirm = [r for r in robust_runs if r.data.tags["ssa_tune.stage"] == "confirm"]
    assert len(select) == len(rob) * 2 * 2  # configs x seeds x (main + long_context)
    assert {r.data.tags["ssa_tune.variant"] for r in select} == {"main", "long_context"}
    # the verdict is confirmed on seeds nobody chose on: the chosen SSA and baseline configs and the baseline
    # with SSA added, paired by seed (confirm_seeds: 2, one look)
    v = rep["verdict"]
    trio = {v["ssa_config"], v["baseline_config"], v["ssa_alone_config"]}
    assert len(confirm) == 2 * len(trio) and {r.data.tags["ssa_tune.config"] for r in confirm} == trio
    confirm_seeds = {r.data.tags["ssa_tune.seed"] for r in confirm}
    assert not confirm_seeds & {r.data.tags["ssa_tune.seed"] for r in select}
    assert v["seeds"] == [20000, 20001] and v["looks"] == [2]
    assert v["ssa_minus_baseline"]["method"].startswith("group-sequential paired t")
    # seeds vary training only: every run is scored on the study's own evaluation data
    assert {r.data.params["dataset.eval_seed"] for r in robust_runs} == {"0"}
    assert len({r.data.params["train.seed"] for r in robust_runs}) == 4
    status = run_here("status", "tiny", "--workdir", wd).stdout
    assert f"  verdict: {v['answer']}" in status and "  recommendation: " in status
    # the export takes the robust winner and says so
    out = tmp_path / "best.json"
    run_here("export", "tiny", "-o", out, "--workdir", wd)
    exported = json.loads(out.read_text())
    assert f"trial-{exported['study']['trial']}" == rep["winner"]
    assert exported["source"]["selected_by"].startswith("robust score over 2 fresh seeds")
    assert exported["source"]["decision"] == decision
    # without --arm the note speaks of the winner (a loop over the arms once overwrote the --arm argument)
    assert "--arm" not in exported["source"]["note"]
    assert exported["source"]["recommendation"] == v["recommendation"]["text"]
    # --arm: each arm's configuration the verdict compared, whichever won (the SSA settings to try elsewhere)
    for arm, config in (("ssa", v["ssa_config"]), ("baseline", v["baseline_config"])):
        out = tmp_path / f"{arm}.json"
        run_here("export", "tiny", "-o", out, "--arm", arm, "--workdir", wd)
        exported = json.loads(out.read_text())
        assert f"trial-{exported['study']['trial']}" == config and exported["source"]["winner"] == arm
        assert exported["source"]["selected_by"].startswith(f"the {arm} arm's best: robust score over 2 fresh seeds")
        assert (exported["ssa"]["query_position"] == "none") == (arm == "baseline")
    bad = run_here("export", "tiny", "-o", tmp_path / "x.json", "--arm", "both", "--workdir", wd, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --arm: must be one of this study's arms (baseline, ssa), got 'both'"
    assert not (tmp_path / "x.json").exists()


def test_ui_serves_the_study_on_loopback(tmp_path):
    """`ssa-tune ui` starts the MLflow UI over the work dir's store, bound to 127.0.0.1."""
    import socket
    import urllib.request

    from ssa_tune.track import Tracker

    wd = tmp_path / "wd"
    wd.mkdir()
    tracker = Tracker(f"sqlite:///{wd / 'mlflow.db'}", "ui-study", wd / "mlartifacts")
    tracker.parent_run("ui-study", None, {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*SSA_TUNE, "ui", "--workdir", str(wd), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and body is None:
            time.sleep(1)
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10",
                                            timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                continue
        assert body is not None, "the UI did not answer"
        assert "ui-study" in {e["name"] for e in body["experiments"]}
        # bound to loopback only
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local and all(addr == f"127.0.0.1:{port}" for addr in local), listening
        # SIGTERM to the command alone (as `kill PID` or a service manager sends it): the server it started
        # and the server's workers end with it, nothing serves on the port afterwards
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: not subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                            text=True).stdout.strip(), 20, f"port {port} to close")
    finally:
        if proc.poll() is None:  # a failure above: let the command end its server, then make sure
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        kill_group(proc.pid)
    first_line = proc.stdout.read().splitlines()[0]
    assert first_line == f"MLflow UI: http://127.0.0.1:{port}  (Ctrl-C to stop)"


def test_text_spec_with_a_relative_path_as_a_new_user_types_it(tmp_path):
    """`ssa-tune run search_spaces/text.yaml --set dataset.path=corpus.txt` from the folder holding the corpus:
    the path is relative to where the user stands, not to where Ray runs the trials."""
    (tmp_path / "corpus.txt").write_text((ROOT / "README.md").read_text() * 3)
    proc = run_here("run", ROOT / "search_spaces" / "text.yaml", "--set", "dataset.path=corpus.txt",
                   "--set", "train.max_steps=20", "--set", "train.eval_every=10", "--trials", "2",
                   "--json", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["trials"]["failed"] == 0
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 2
    assert (tmp_path / ".ssa_tune" / "optuna.db").exists()  # the default work dir is ./.ssa_tune


@pytest.mark.parametrize("budget", ["tokens", "searched-steps", "tokens-searched-batch"])
def test_a_trial_that_trains_to_its_own_end_is_complete(tmp_path, budget):
    """With a token budget, with max_steps searched, or with a token budget and a searched batch size (each
    trial its own length), a trial that reached its own end is COMPLETE: not PRUNED because it stopped short of
    some other step or token count (the scheduler's axis is each trial's own progress)."""
    changes = {"budget": {"n_trials": 3}, "sampler": {"kind": "random", "seed": 1},
               "scheduler": {"kind": "asha", "grace_steps": 10, "reduction_factor": 3}}
    if budget == "tokens":
        changes["train"] = {"max_tokens": 8 * 128 * 30, "eval_every": 10}  # 30 steps of batch 8 x 128 tokens
    elif budget == "searched-steps":
        changes["train"] = {"eval_every": 10}
        changes["search"] = {**TINY["search"], "train.max_steps": {"type": "int", "low": 20, "high": 40, "step": 10}}
    else:  # batch 4: 60 steps, batch 8: 30 steps of the same tokens
        changes["train"] = {"max_tokens": 8 * 128 * 30, "eval_every": 10}
        changes["search"] = {**TINY["search"], "train.batch_size": {"type": "categorical", "choices": [4, 8]}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(deep_update(TINY, changes)))
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    assert summary["trials"]["complete"] >= 1 and summary["trials"]["failed"] == 0
    study = _study(wd)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            own_end = {"tokens": 30, "searched-steps": t.params.get("train.max_steps", 40),
                       "tokens-searched-batch": 8 * 30 // t.params.get("train.batch_size", 8)}[budget]
            assert max(t.intermediate_values) == own_end, (t.number, t.intermediate_values)


def test_values_invalid_together_fail_one_trial_not_the_study(tmp_path):
    """d_model 32 and n_head 3 are each fine with the other's first value, so `validate` passes; drawn
    together they cannot make a model: that trial is FAIL with the reason, and the study goes on."""
    raw = deep_update(TINY, {"budget": {"n_trials": 6}, "sampler": {"kind": "random", "seed": 0},
                             "scheduler": {"kind": "none"}, "train": {"max_steps": 10, "eval_every": 10}})
    raw["search"] = {"model.d_model": {"type": "categorical", "choices": [48, 32]},
                     "model.n_head": {"type": "categorical", "choices": [2, 3]}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert run_here("validate", spec).returncode == 0
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 6
    failed = [t for t in _study(wd).trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, "seed 0 draws the invalid pair (32, 3)"
    for t in failed:
        assert (t.params["model.d_model"], t.params["model.n_head"]) == (32, 3)
        assert t.user_attrs["ssa_tune.fail_reason"] == \
            "invalid combination of values: d_model: 32 must be divisible by n_head=3"
    client, runs = _runs(wd)
    states = {r.data.tags["ssa_tune.trial_number"]: r.data.tags["ssa_tune.state"] for r in runs
              if r.data.tags.get("ssa_tune.role") == "trial"}
    assert all(states[str(t.number)] == "FAIL" for t in failed)


def test_export_takes_a_baseline_winner_that_is_not_a_trial(tmp_path):
    """When no baseline trial finished, the robustness stage re-trains the baseline's default configuration;
    if that wins, the export is the identity SSAConfig chosen by the robust score, not the SSA search-best."""
    from ssa_tune import study as st
    from ssa_tune.study import ATTR_ROBUSTNESS

    wd = tmp_path / "wd"
    storage = st.open_storage(f"sqlite:///{wd / 'optuna.db'}")
    study = optuna.create_study(study_name="tiny", storage=storage)
    dists = {"ssa.enabled": optuna.distributions.CategoricalDistribution([True, False]),
             "ssa.query_gate": optuna.distributions.CategoricalDistribution(["none", "linear", "shared"])}
    study.add_trial(optuna.trial.create_trial(params={"ssa.enabled": True, "ssa.query_gate": "shared"},
                                              distributions=dists, value=1.0, user_attrs={"ssa_tune.arm": "ssa"}))
    study.set_user_attr(st.ATTR_SPEC, json.dumps(TINY))
    row = {"mean": 0.8, "std": 0.01, "seeds": 2, "failed": 0, "values": [0.79, 0.81], "score": 0.81, "rank": 1}
    study.set_user_attr(ATTR_ROBUSTNESS, {
        "objective": "val_loss", "penalty": 1.0, "winner": "baseline",
        "summary": {"baseline": row, "trial-0": {**row, "mean": 1.0, "score": 1.02, "rank": 2}},
        "configs": {"baseline": {"ssa.enabled": False}, "trial-0": {"ssa.enabled": True, "ssa.query_gate": "shared"}}})
    out = tmp_path / "best.yaml"
    proc = run_here("export", "tiny", "-o", out, "--workdir", wd)
    exported = yaml.safe_load(out.read_text())
    assert exported["source"]["winner"] == "baseline"
    assert exported["source"]["selected_by"].startswith("robust score over 2 fresh seeds")
    assert exported["ssa"]["query_position"] == "none" and exported["ssa"]["query_gate"] == "none"
    assert exported["study"]["config"] == "baseline" and "(baseline, robust score)" in proc.stdout


def test_a_report_with_a_configuration_no_seed_finished_renders(tmp_path):
    """Every robustness seed of one configuration diverged: it has no mean. The report (HTML, JSON, PNGs)
    still renders and says so (it once crashed in matplotlib adding None)."""
    from ssa_tune import study as st
    from ssa_tune.driver import resolve_target
    from ssa_tune.report import build
    from ssa_tune.study import ATTR_ROBUSTNESS

    wd = tmp_path / "wd"
    storage = st.open_storage(f"sqlite:///{wd / 'optuna.db'}")
    study = optuna.create_study(study_name="tiny", storage=storage)
    dists = {"ssa.enabled": optuna.distributions.CategoricalDistribution([True, False]),
             "train.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)}
    for i, (on, lr, v) in enumerate([(False, 3e-3, 1.0), (True, 2e-3, 0.9), (True, 5e-3, 0.95), (False, 8e-3, 1.1),
                                     (True, 1e-3, 1.2), (False, 1.5e-3, 1.05)]):
        study.add_trial(optuna.trial.create_trial(params={"ssa.enabled": on, "train.lr": lr}, distributions=dists,
                                                  value=v, user_attrs={"ssa_tune.arm": "ssa" if on else "baseline"}))
    study.set_user_attr(st.ATTR_SPEC, json.dumps(TINY))
    row = {"mean": 0.8, "std": 0.01, "seeds": 2, "failed": 0, "values": [0.79, 0.81], "score": 0.81, "rank": 1}
    dead = {"mean": None, "std": None, "seeds": 2, "failed": 2, "values": [None, None], "score": None, "rank": None}
    study.set_user_attr(ATTR_ROBUSTNESS, {
        "objective": "val_loss", "penalty": 1.0, "winner": "trial-0",
        "summary": {"trial-0": row, "trial-1": dead},
        "configs": {"trial-0": {"ssa.enabled": False, "train.lr": 3e-3},
                    "trial-1": {"ssa.enabled": True, "train.lr": 2e-3}}})
    target = resolve_target(None, None, str(wd), None, None, "tiny")
    rep = build(study, target, tmp_path / "report")
    assert rep["robustness"]["trial-1"]["mean"] is None
    assert (tmp_path / "report" / "robustness.png").stat().st_size > 5_000
    assert "trial-1" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.parametrize("kind", ["hyperband", "median"])
def test_every_scheduler_runs_both_arms_to_their_budgets(tmp_path, kind):
    """`scheduler.kind: hyperband` and `median` with two arms: each arm's trials are chosen and run (the per-arm
    scheduler once asked only the first arm's for the next trial), none restarts at step 0, and a trial is
    COMPLETE at its own end or PRUNED where its arm's scheduler stopped it."""
    changes = {"budget": {"n_trials": 6}, "sampler": {"kind": "random", "seed": 2},
               "train": {"max_steps": 40, "eval_every": 10},
               "scheduler": {"kind": kind, "grace_steps": 10, "reduction_factor": 2},
               "resources": {"max_concurrent": 2}}  # the arms' trials side by side
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(deep_update(TINY, changes)))
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    assert summary["trials"]["failed"] == 0 and summary["trials"]["running"] == 0
    by_arm = summary["trials_by_arm"]
    assert {a: c["complete"] + c["pruned"] for a, c in by_arm.items()} == {"baseline": 3, "ssa": 3}
    for t in _study(wd).trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(10, steps[-1] + 1, 10)), (t.number, steps)  # one pass, never from step 0 again
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert steps[-1] == 40
        else:
            assert t.state == optuna.trial.TrialState.PRUNED and steps[-1] < 40


def test_the_searcher_answers_at_once_when_none_of_its_trials_runs(write_spec, tmp_path):
    """While its trials run, the searcher waits quietly (no storage query on every ask); once none runs, Tune
    blocks on it, asking once a second, so it must answer at once: right after the last trial ended it says the
    search is over (it said "not yet" for another half second, which cost a study 1-2 s at each end)."""
    from ssa_tune import study as st
    from ssa_tune.spec import load_spec
    from ssa_tune.track import Mirror, Tracker
    from ssa_tune.tune.searcher import StudySearch
    from ray.tune.search import Searcher

    spec = load_spec(str(write_spec({"budget": {"n_trials": 1}, "baseline": False})), [])
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = st.create_or_load(spec, st.open_storage(url), "tiny")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny", tmp_path / "artifacts")
    mirror = Mirror(tracker, tracker.parent_run("tiny", None, {}), "tiny")
    done = []
    search = StudySearch(spec=spec, study=study, storage_url=url, budgets=spec.arm_budgets(1), driver="me",
                         mirror=mirror, trials={}, on_done=lambda *a: done.append(a), max_failures=4,
                         make_plan=None, time_limit_s=None)
    try:
        config = search.suggest("a")
        assert isinstance(config, dict)  # the one trial of the budget
        assert search.suggest("b") is None  # the budget is out, but trial "a" still runs: wait for it
        search.on_trial_complete("a", {"step": 40, "progress": 1.0, "val_loss": 1.0})
        assert done and done[0][1] == "COMPLETE"
        assert search.suggest("c") == Searcher.FINISHED  # at once, not after a quiet period
    finally:
        mirror.close(timeout=60)


def test_a_local_ray_starts_no_idle_workers_that_no_trial_could_take():
    """Ray starts idle workers with a new instance, but a trial actor never takes one (Ray Tune gives each trial
    actor a runtime env of its own): they only cost CPU at start. A local instance of ours starts none; the
    trial workers start when the trials do (what every study here already shows)."""
    code = ("import time, psutil\nfrom ssa_tune.tune.cluster import init_ray\ninit_ray(None)\n"
            "time.sleep(3)  # Ray's idle workers, when it starts them, are up within a second\n"
            "print(sorted(p.name() for p in psutil.Process().children(recursive=True)))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_prestart_worker_first_driver"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.strip().splitlines()[-1]
    assert "ray::RuntimeEnvAgent" in names  # Ray did start (its agents are there)
    assert "ray::IDLE" not in names, names
