"""Imports point one way: the core imports with torch alone, the service's adapters load only what they adapt,
and validating a spec needs neither torch, Ray, Optuna nor MLflow."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, TINY


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_core_imports_without_the_service_stack():
    loaded = _modules_after("import ssa_tune\nssa_tune.convert(ssa_tune.GPT(ssa_tune.GPTConfig()), ssa_tune.SSAConfig())")
    assert "torch" in loaded
    assert not loaded & {"optuna", "ray", "mlflow", "transformers", "sqlalchemy", "typer"}


def test_validating_a_spec_imports_no_torch(tmp_path):
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    loaded = _modules_after(f"from ssa_tune.cli import app\nfrom typer.testing import CliRunner\n"
                            f"r = CliRunner().invoke(app, ['validate', {str(spec)!r}])\nassert r.exit_code == 0, r.output")
    assert not loaded & {"torch", "optuna", "ray", "mlflow"}


def test_hugging_face_adapters_load_when_a_transformers_model_is_converted():
    code = ("import sys, transformers, ssa_tune\n"
            "m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16,"
            " n_positions=16, bos_token_id=0, eos_token_id=0))\n"
            "assert 'ssa_tune.hf' not in sys.modules\n"
            "ssa_tune.convert(m, ssa_tune.SSAConfig())\n"
            "assert m.transformer.h[0].attn.temps is not None")
    assert "ssa_tune" in _modules_after(code)


# The package's layers, lowest first: a module imports only from layers below its own (function-level
# imports included, which once hid two cycles: convert <-> hf <-> optim, export <-> robustness).
LAYERS = [
    {"errors", "redact", "checks", "selection", "sequential", "data"},
    {"config", "verdict"},
    {"attention", "convert"},
    {"model", "__init__", "optim"},
    {"stats", "hf", "spec"},
    {"train", "study", "track", "analyse"},
    {"trial"},
    {"robustness"},
    {"tune"},
    {"jobs", "export", "driver"},
    {"report", "poc"},
    {"cli"},
    {"__main__"},
]


def _imports(path) -> set[str]:
    """The ssa_tune modules `path` imports anywhere in it (top level or inside functions)."""
    import ast

    inside_data = path.parent.name == "data"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("ssa_tune."):
                out.add(node.module.split(".")[1])
            elif node.level >= 1 and not (inside_data and node.level == 1):
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update("__init__" if a.name.startswith("__") else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ssa_tune."))
    return out


def test_every_import_points_down_the_layers():
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    package = ROOT / "ssa_tune"
    modules = {("data" if p.parent.name == "data" else p.stem): p for p in sorted(package.rglob("*.py"))}
    unknown = {m for m in modules if m not in layer}
    assert not unknown, f"modules not in any layer: {sorted(unknown)}"
    upward = []
    for p in sorted(package.rglob("*.py")):
        me = "data" if p.parent.name == "data" else p.stem
        for dep in _imports(p) - {me}:
            if layer.get(dep, -1) >= layer[me]:
                upward.append(f"{p.relative_to(ROOT)} imports {dep} (layer {layer.get(dep)} >= {layer[me]})")
    assert not upward, "\n".join(upward)
