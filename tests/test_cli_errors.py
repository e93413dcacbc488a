"""Bad input: one line `error: FILE: field: reason`, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from ssa_tune.cli import app

from .conftest import TINY, deep_update, run_cli

runner = CliRunner()

BAD_SPECS = [
    # (id, changes to the tiny spec or raw text, expected "field: reason" start)
    ("unknown-section", {"optimizer": {"lr": 1}}, "optimizer: unknown key"),
    ("unknown-train-key", {"train": {"lrr": 0.1}}, "train.lrr: unknown train field"),
    ("wrong-type", {"train": {"max_steps": "ten"}}, "train.max_steps: must be an integer"),
    ("bad-model", {"model": {"d_model": 30, "n_head": 4}}, "model.d_model: 30 must be divisible"),
    ("bad-ssa-choice", {"ssa": {"query_gate": "maybe"}}, "ssa.query_gate: must be one of"),
    ("inverted-range", {"search": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}},
     "search.train.lr: inverted range"),
    ("empty-range", {"search": {"train.lr": {"type": "float", "low": 0.01, "high": 0.01}}},
     "search.train.lr: empty range"),
    ("log-nonpositive", {"search": {"train.lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}},
     "search.train.lr.low: must be > 0"),
    ("bad-choice-value", {"search": {"ssa.query_gate": {"type": "categorical", "choices": ["none", "bogus"]}}},
     "search.ssa.query_gate: value 'bogus' is invalid"),
    ("range-outside-config", {"search": {"ssa.token_scale": {"type": "float", "low": 0.5, "high": 1.5}}},
     "search.ssa.token_scale: value 1.5 is invalid"),
    ("unknown-param-key", {"search": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "lg": True}}},
     "search.train.lr.lg: unknown key"),
    ("bad-param-type", {"search": {"train.lr": {"type": "real", "low": 1e-3, "high": 1e-2}}},
     "search.train.lr.type: must be one of"),
    ("missing-dataset-path", {"dataset": {"kind": "text", "path": "no/such/corpus.txt"}},
     "dataset.path: no/such/corpus.txt: no such file"),
    ("unknown-dataset-kind", {"dataset": {"kind": "imagenet"}}, "dataset.kind: must be one of"),
    ("unknown-dataset-param", {"dataset": {"kind": "markov", "nodes": 5}}, "dataset.nodes: unknown key"),
    ("bad-scheduler", {"scheduler": {"kind": "pbt"}}, "scheduler.kind: must be one of"),
    ("bad-budget", {"budget": {"n_trials": 0}}, "budget.n_trials: must be an integer >= 1"),
    ("one-trial-two-arms", {"budget": {"n_trials": 1}}, "budget.n_trials: must be >= 2: the baseline and the SSA arm"),
    ("bad-arm-share", {"budget": {"baseline_share": 1.0}}, "budget.baseline_share: must be in (0, 1)"),
    ("searched-switch", {"search": {"ssa.enabled": {"type": "bool"}}}, "search.ssa.enabled: SSA on/off is not searched"),
    ("bad-custom-resource", {"resources": {"custom": {"CPU": 1}}}, "resources.custom.CPU: must name a custom Ray"),
    ("unknown-resource", {"resources": {"gpu": 1}}, "resources.gpu: unknown key"),
    ("bad-objective", {"objective": {"metric": "val_loss", "direction": "down"}}, "objective.direction: must be"),
    ("bad-margin", {"verdict": {"margin": "abc"}}, "verdict.margin: must be a number > 0 or a percentage"),
    ("negative-margin", {"verdict": {"margin": -0.1}}, "verdict.margin: must be > 0"),
    ("margin-over-100%", {"verdict": {"margin": "200%"}}, "verdict.margin: a relative margin must be between"),
    ("zero-cost-tolerance", {"verdict": {"max_cost": {"latency_ms_per_token": 0}}},
     "verdict.max_cost.latency_ms_per_token: must be > 0"),
    ("unknown-cost", {"verdict": {"max_cost": {"flops": 1.1}}}, "verdict.max_cost.flops: unknown cost"),
    ("unknown-verdict-key", {"verdict": {"budget": 3}}, "verdict.budget: unknown key"),
    ("one-confirm-seed", {"robustness": {"confirm_seeds": 1}}, "robustness.confirm_seeds: must be an integer >= 2"),
    ("confirm-max-below-min", {"robustness": {"confirm_seeds": {"min": 5, "max": 3}}},
     "robustness.confirm_seeds.max: must be >= min (5)"),
    ("confirm-step-zero", {"robustness": {"confirm_seeds": {"step": 0}}},
     "robustness.confirm_seeds.step: must be an integer >= 1"),
    ("confirm-unknown-key", {"robustness": {"confirm_seeds": {"rounds": 2}}},
     "robustness.confirm_seeds.rounds: unknown key"),
    ("multi-objective-with-asha", {"objective": [{"metric": "val_loss"}, {"metric": "latency_ms_per_token"}]},
     "scheduler.metric: several objectives: say which metric early stopping watches"),
]


def _assert_one_line(result, spec_path, expected):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {spec_path}: {expected}"), lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case,changes,expected", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, case, changes, expected, command):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(deep_update(TINY, changes), sort_keys=False))
    workdir = tmp_path / "wd"
    args = [command, str(spec)] + (["--workdir", str(workdir)] if command == "run" else [])
    result = runner.invoke(app, args)
    _assert_one_line(result, spec, expected)
    assert not workdir.exists()


def test_yaml_syntax_error(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\ndataset: {kind: markov\ntrain: [\n")
    result = runner.invoke(app, ["run", str(spec), "--workdir", str(tmp_path / "wd")])
    _assert_one_line(result, spec, "invalid YAML: line")
    assert not (tmp_path / "wd").exists()


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    _assert_one_line(result, tmp_path / "nope.yaml", "file not found")


def test_unreachable_storage_writes_nothing(write_spec, tmp_path):
    spec = write_spec()
    result = runner.invoke(app, ["run", str(spec), "--workdir", str(tmp_path / "wd"),
                                 "--storage", "postgresql+psycopg2://root:secret@127.0.0.1:9/test"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: storage: cannot connect to postgresql+psycopg2://root:***@127.0.0.1:9/test")
    assert "secret" not in result.output and "\n" not in line
    assert not (tmp_path / "wd").exists()


def test_unreachable_tracking_server(write_spec, tmp_path):
    spec = write_spec({"tracking": "http://127.0.0.1:9"})
    result = runner.invoke(app, ["run", str(spec), "--workdir", str(tmp_path / "wd")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: tracking: cannot reach MLflow tracking server http://127.0.0.1:9")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("value", ["5", "many"])
def test_a_bad_resample_setting_is_one_line_before_anything_runs(write_spec, tmp_path, value):
    spec = write_spec()
    result = runner.invoke(app, ["run", str(spec), "--workdir", str(tmp_path / "wd")],
                           env={"SSA_TUNE_IMPORTANCE_RESAMPLES": value})
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: SSA_TUNE_IMPORTANCE_RESAMPLES: must be an integer >= 20 (bootstrap "
                                     f"resamples of the report's importances), got '{value}'")
    assert not (tmp_path / "wd").exists()


def test_set_override_is_validated(write_spec):
    spec = write_spec()
    result = runner.invoke(app, ["validate", str(spec), "--set", "train.max_steps=-3"])
    _assert_one_line(result, spec, "train.max_steps: must be an integer >= 1")


def test_set_takes_yaml_numbers_as_the_help_writes_them(write_spec):
    """`--set train.lr=1e-3` is the CLI's own help example; YAML 1.1 would read it as the string '1e-3'."""
    spec = write_spec()
    result = runner.invoke(app, ["validate", str(spec), "--set", "train.lr=1e-3", "--set", "train.max_steps=2e1"])
    assert result.exit_code == 2 and "train.max_steps: must be an integer" in result.output  # 2e1 is a float
    result = runner.invoke(app, ["validate", str(spec), "--set", "train.lr=1e-3"])
    assert result.exit_code == 0, result.output
    from ssa_tune.spec import load_spec

    assert load_spec(spec, ["train.lr=1e-3"]).train["lr"] == 0.001
    spec.write_text(spec.read_text().replace("lr: 0.003", "lr: 3e-3"))  # the same in the file itself
    assert load_spec(spec).train["lr"] == 0.003


def test_set_a_field_under_a_scalar_replaces_it(write_spec):
    """`--set ssa.layers.count=2` on a spec with `layers: all` converts the top 2 layers (no traceback)."""
    spec = write_spec({"model": {"n_layer": 3}, "ssa": {"layers": "all"}})
    result = runner.invoke(app, ["validate", str(spec), "--set", "ssa.layers.count=2"])
    assert result.exit_code == 0, result.output
    from ssa_tune.config import LayerPlacement
    from ssa_tune.spec import load_spec

    _, _, _, ssa = load_spec(spec, ["ssa.layers.count=2"]).trial_config({})
    assert ssa.layers == LayerPlacement(2, "top") and ssa.resolve_layers(3) == (1, 2)


def test_unknown_study_is_one_line(tmp_path):
    result = runner.invoke(app, ["status", "nope", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: storage: no study database at")


def test_real_process_prints_one_line_to_stderr(tmp_path):
    """The same through a real `ssa-tune` process: stderr is the one line, stdout is empty."""
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(deep_update(TINY, {"train": {"lrr": 1}})))
    proc = run_cli("run", spec, "--workdir", tmp_path / "wd", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == f"error: {spec}: train.lrr: unknown train field " \
        "(known: batch_size, beta1, beta2, device, eval_every, freeze, grad_accum, grad_clip, latency_tokens, lr, " \
        "max_steps, max_tokens, min_lr_frac, seed, threads, warmup_steps, weight_decay)"
    assert not (tmp_path / "wd").exists()


def test_submit_needs_shared_stores(write_spec):
    spec = write_spec()
    result = runner.invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:9"])
    _assert_one_line(result, spec, "storage: a cluster study needs a shared storage URL")


def test_submit_to_a_bad_ray_address_is_one_line(write_spec):
    spec = write_spec()
    result = runner.invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:9",
                                 "--storage", "postgresql+psycopg2://root@127.0.0.1:5432/test",
                                 "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: --address: cannot reach the Ray Jobs API at http://127.0.0.1:9")
    assert "\n" not in result.output.strip()


def test_unreadable_or_incompatible_storage_files_are_one_line(tmp_path, write_spec):
    """A corrupt optuna.db, one of another Optuna schema, a corrupt mlflow.db: one line, exit 2."""
    import sqlite3

    import optuna

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "optuna.db").write_text("this is not a database\n" * 20)
    for args in (["status"], ["studies"], ["best", "x"]):
        result = runner.invoke(app, [*args, "--workdir", str(wd)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert result.output.strip() == f"error: storage: {wd / 'optuna.db'}: not a readable study database " \
            "(file is not a database)"
    assert sorted(p.name for p in wd.iterdir()) == ["optuna.db"]  # nothing written beside it
    (wd / "optuna.db").unlink()
    optuna.create_study(study_name="x", storage=f"sqlite:///{wd / 'optuna.db'}")
    with sqlite3.connect(wd / "optuna.db") as con:
        con.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    result = runner.invoke(app, ["status", "--workdir", str(wd)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: storage: sqlite:///{wd / 'optuna.db'}: written by another Optuna version")
    (wd / "optuna.db").unlink()
    (wd / "mlflow.db").write_text("junk")
    spec = write_spec()
    result = runner.invoke(app, ["run", str(spec), "--workdir", str(wd)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"error: tracking: {wd / 'mlflow.db'}: not a readable MLflow database")
