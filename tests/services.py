"""Real services for the service tests, started on 127.0.0.1: a multi-node Ray cluster (nodes are process
trees on this machine, each with its own name and resources), an MLflow tracking server, and the local
PostgreSQL server (restartable). Nothing is mocked; a missing service makes the tests fail, not skip."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PG_URL = "postgresql+psycopg2://root@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment as a new user's shell has it: no project venv on PATH, no Ray or MLflow variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "SSA_TUNE_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin", PYTHONUNBUFFERED="1", **extra)
    return env


# ------------------------------------------------------------------------------------------------ MLflow


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a SQLite store in `root`; stop() and start() keep the same store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "MlflowServer":
        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
                                     env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for(self.healthy, timeout, f"the MLflow server on port {self.port}")
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        wait_for(lambda: not self.healthy(), 30, "the MLflow server to stop")


# ---------------------------------------------------------------------------------------------------- Ray


class RayCluster:
    """A head node and named worker nodes started with the project's `ray` as a new user would, from a shell
    whose PATH does not hold the venv, with token authentication on (the head writes $HOME/.ray/auth_token)."""

    def __init__(self, home: Path):
        self.home = home
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = clean_env(home, RAY_AUTH_MODE="token")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.home)
        assert proc.returncode == 0, f"ray {' '.join(args)}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    def start_head(self, cpus: int = 1) -> "RayCluster":
        self._ray("get-auth-token", "--generate")
        self._ray("start", "--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                  "--dashboard-port", str(self.dashboard_port), "--num-cpus", str(cpus), "--node-name", "head")
        return self

    def add_node(self, name: str, cpus: int, resources: dict[str, float]) -> None:
        self._ray("start", "--address", self.address, "--num-cpus", str(cpus), "--node-name", name,
                  "--resources", json.dumps(resources))
        wait_for(lambda: name in self.alive_node_names(), 60, f"node {name} to join")

    def alive_node_names(self) -> set[str]:
        code = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([n['NodeName'] for n in ray.nodes() if n['Alive']]))" % self.address)
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return set(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            return set()

    def node_id(self, name: str) -> str:
        code = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps({n['NodeName']: n['NodeID'] for n in ray.nodes() if n['Alive']}))" % self.address)
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout.strip().splitlines()[-1])[name]

    def kill_node(self, name: str) -> int:
        """What `ray stop --force` does on that node's host: SIGKILL its raylet and every process under it."""
        import psutil

        killed = 0
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].endswith("raylet") and f"--node-name={name}" in cmd:
                for q in [*p.children(recursive=True), p]:
                    try:
                        q.kill()
                        killed += 1
                    except psutil.NoSuchProcess:
                        pass
        assert killed, f"no raylet for node {name}"
        return killed

    def stop(self) -> None:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------------------ Postgres


def restart_postgres() -> None:
    """`pg_ctlcluster VERSION main restart` on the local server (as the issue's fault asks)."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    proc = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"]).returncode == 0, 60,
             "PostgreSQL to accept connections")
