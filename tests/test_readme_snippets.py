"""The README's "Use the best configuration in your project" snippets run as written, each in a fresh Python
process, in a folder holding a `best.yaml` (as `ssa-tune export` writes it) and a tiny Hugging Face checkpoint
`my-checkpoint` with its tokenizer.

The snippets are the ```python blocks right after the markers `<!-- snippet:gpt -->` and `<!-- snippet:hf -->`
in README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_hf_study import make_checkpoint

NAMES = ("gpt", "hf")


def snippets() -> dict[str, str]:
    """{name: code} of the README's marked snippets."""
    text = (ROOT / "README.md").read_text()
    found = {}
    for name in NAMES:
        m = re.search(rf"<!-- snippet:{name} -->\s*```python\n(.*?)```", text, re.S)
        assert m, f"README.md: no ```python block after <!-- snippet:{name} -->"
        found[name] = m.group(1)
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A user's project folder: best.yaml as `ssa-tune export` writes it, and a local checkpoint."""
    from ssa_tune import SSAConfig, save_config

    folder = tmp_path_factory.mktemp("project")
    cfg = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", token_scale=0.4,
                    layers={"count": 1, "placement": "top"}, temperature_lr_mult=100.0)
    save_config(cfg, folder / "best.yaml",
                model={"kind": "hf", "path": "my-checkpoint", "dtype": "float32", "attn_implementation": "sdpa"},
                train={"lr": 1.0e-4, "weight_decay": 0.0, "freeze": "below", "max_steps": 60, "batch_size": 4},
                dataset={"kind": "text", "path": "corpus.txt", "tokenizer": "my-checkpoint"},
                metrics={"val_loss": 4.1}, source={"winner": "ssa", "selected_by": "test"})
    make_checkpoint(folder / "my-checkpoint", (ROOT / "README.md").read_text())
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_the_snippet_runs_in_a_fresh_process(project, name):
    code = snippets()[name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"snippet {name} failed:\n{code}\n--- stderr\n{proc.stderr[-4000:]}"
    if name == "gpt":
        assert (project / "gpt-ssa.pt").is_file() and (project / "gpt-ssa.yaml").is_file()
    else:
        saved = {p.name for p in (project / "my-checkpoint-ssa").iterdir()}
        assert {"config.json", "model.safetensors", "ssa_config.yaml", "ssa_weights.safetensors"} <= saved
