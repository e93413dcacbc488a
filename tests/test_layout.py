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
    {"errors", "redact", "checks", "selection", "sequential", "data", "compat"},
    {"config", "verdict"},
    {"attention", "convert"},
    {"model", "__init__", "optim"},
    {"stats", "hf", "spec"},
    {"train", "study", "track", "analyse"},
    {"trial"},
    {"robustness", "tune.trainable", "tune.cluster"},
    {"tune.scheduler", "tune.progress"},
    {"tune.searcher"},
    {"tune.run", "tune"},
    {"jobs", "export", "driver"},
    {"report", "poc"},
    {"cli"},
    {"__main__"},
]


def _name(path) -> str:
    """A module's name in LAYERS: `data/` is one unit (its modules import each other freely); the modules of
    `tune/` are layered one by one, as `tune.<module>` (its `__init__` is `tune`)."""
    if path.parent.name == "data":
        return "data"
    if path.parent.name == "tune":
        return "tune" if path.stem == "__init__" else f"tune.{path.stem}"
    return path.stem


def _imports(path) -> set[str]:
    """The ssa_tune modules `path` imports anywhere in it (top level or inside functions), named as in LAYERS."""
    import ast

    package = path.parent.name if path.parent.name in ("data", "tune") else None

    def named(dotted: str) -> set[str]:  # "tune.run" / "tune" / "study.x" -> its LAYERS name
        parts = dotted.split(".")
        if parts[0] == "tune" and len(parts) > 1:
            return {f"tune.{parts[1]}"}
        return {parts[0]}

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:  # absolute: only ssa_tune's own modules count
                if not (node.module or "").startswith("ssa_tune."):
                    continue
                base = node.module.split(".", 1)[1]
            elif node.level == 1 and package == "data":
                continue  # within data/
            else:  # relative: level 1 inside a sub-package is that package, else the package's top
                inside = [package] if package and node.level == 1 else []
                base = ".".join(inside + ([node.module] if node.module else []))
            if base in ("", "tune"):  # `from . import study`, `from .tune import cluster`: the names are modules
                for a in node.names:
                    out |= {"__init__"} if a.name.startswith("__") else named(f"{base}.{a.name}".lstrip("."))
            else:
                out |= named(base)
        elif isinstance(node, ast.Import):
            out.update(n for a in node.names if a.name.startswith("ssa_tune.") for n in named(a.name.split(".", 1)[1]))
    return out


def test_every_import_points_down_the_layers():
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    package = ROOT / "ssa_tune"
    modules = {_name(p): p for p in sorted(package.rglob("*.py"))}
    unknown = {m for m in modules if m not in layer}
    assert not unknown, f"modules not in any layer: {sorted(unknown)}"
    upward = []
    for p in sorted(package.rglob("*.py")):
        me = _name(p)
        for dep in _imports(p) - {me}:
            if layer.get(dep, -1) >= layer[me]:
                upward.append(f"{p.relative_to(ROOT)} imports {dep} (layer {layer.get(dep)} >= {layer[me]})")
    assert not upward, "\n".join(upward)


def test_the_layout_check_sees_imports_inside_functions_and_sub_packages(tmp_path):
    """The check itself: a function-level import upward, a relative import from tune/ to the package's top,
    and one between tune/'s modules are each named as LAYERS names them."""
    (tmp_path / "tune").mkdir()
    mod = tmp_path / "tune" / "searcher.py"
    mod.write_text("from .. import study as st\nfrom .trainable import KEY\n\n\ndef f():\n"
                   "    from ..driver import x\n    from ssa_tune.tune.run import fit\n")
    assert _imports(mod) == {"study", "tune.trainable", "driver", "tune.run"}
    top = tmp_path / "spec.py"
    top.write_text("from . import tune\n\n\ndef g():\n    from .tune import run\n    from .tune.cluster import init_ray\n")
    assert _imports(top) == {"tune", "tune.run", "tune.cluster"}


def test_a_worker_unpickling_the_trainable_loads_neither_optuna_nor_mlflow():
    """What a Ray worker imports for its first trial (the trainable, by reference): no Optuna, MLflow or
    SQLAlchemy, which only the driver needs."""
    loaded = _modules_after("import ssa_tune.tune.trainable")
    assert not loaded & {"optuna", "mlflow", "sqlalchemy"}
