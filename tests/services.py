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
PG_SERVER = "postgresql+psycopg2://root@127.0.0.1:5432"
# one database per pytest-xdist worker on the machine's PostgreSQL server (`test` when the suite runs serially):
# parallel workers never see each other's studies; conftest creates it at the session's start
PG_DATABASE = "test" + (f"_{os.environ['PYTEST_XDIST_WORKER']}" if os.environ.get("PYTEST_XDIST_WORKER") else "")
PG_URL = f"{PG_SERVER}/{PG_DATABASE}"


def create_pg_database() -> None:
    """Create this worker's database if it is missing (the server's `test` database always exists)."""
    if PG_DATABASE == "test":
        return
    import sqlalchemy as sa

    engine = sa.create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            if not c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": PG_DATABASE}).first():
                c.execute(sa.text(f'CREATE DATABASE "{PG_DATABASE}"'))
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P + 1 free as well (the README walkthrough's head and worker agents)."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two adjacent free ports")


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
    whose PATH does not hold the venv, with token authentication on (the head writes $HOME/.ray/auth_token).

    Each `ray start` runs in a session of its own: Ray's daemons (GCS, raylet, workers) stay in that process
    group, so a node is stopped by signalling its group, never with `ray stop`, which ends every Ray node on
    the host, other people's included."""

    def __init__(self, home: Path):
        self.home = home
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = clean_env(home, RAY_AUTH_MODE="token")
        self.groups: dict[str, int] = {}  # node name -> the process group of its `ray start`
        # a temporary folder of this cluster's own (short: it holds Unix sockets): in the shared /tmp/ray,
        # `session_latest` is whichever Ray on the machine started last, and a job's driver on this cluster
        # once read another cluster's session there and failed to authenticate
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self, *args: str, node: str | None = None, timeout: float = 120) -> None:
        proc = subprocess.Popen([str(VENV_BIN / "ray"), *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.home, start_new_session=True)
        if node:
            self.groups[node] = proc.pid
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"ray {' '.join(args)}: {out[-2000:]}\n{err[-3000:]}"

    def start_head(self, cpus: int = 1, agent_port: int | None = None) -> "RayCluster":
        self._ray("get-auth-token", "--generate")
        # every node its own agent port: the default (52365) is taken by whichever Ray on this machine came
        # first, and a head whose agent cannot bind has no job agent ("No available agent to submit job")
        self._ray("start", "--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                  "--dashboard-port", str(self.dashboard_port),
                  "--dashboard-agent-listen-port", str(agent_port or free_port()),
                  "--num-cpus", str(cpus), "--node-name", "head", "--temp-dir", self.temp_dir, node="head")
        return self

    def add_node(self, name: str, cpus: int, resources: dict[str, float]) -> None:
        self._ray("start", "--address", self.address, "--num-cpus", str(cpus), "--node-name", name,
                  "--resources", json.dumps(resources), "--dashboard-agent-listen-port", str(free_port()), node=name)
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
        killed = kill_group(self.groups.pop(name))
        assert killed, f"no process left of node {name}"
        return killed

    def stop(self) -> None:
        import shutil

        for name in [n for n in self.groups if n != "head"] + ["head"]:
            if name in self.groups:
                kill_group(self.groups.pop(name))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def kill_group(pgid: int) -> int:
    """SIGKILL every process of the process group `pgid` (one this test started); how many there were."""
    import psutil

    members = group_members(pgid)
    for p in members:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(members, timeout=30)
    return len(members)


def group_members(pgid: int) -> list:
    """The live processes (not zombies) of process group `pgid`."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ Postgres


class PostgresServer:
    """A PostgreSQL server of this test's own (the machine's PostgreSQL binaries, a data directory in `root`,
    trust auth, superuser `root`, a free port on 127.0.0.1): a test that restarts PostgreSQL restarts this one,
    never the machine's server that other tests (and other people) are using."""

    def __init__(self):
        import pwd
        import tempfile

        version = sorted(p.name for p in Path("/usr/lib/postgresql").iterdir())[-1]
        self.bin = Path("/usr/lib/postgresql") / version / "bin"
        # a folder the server's user can reach (pytest's own temporary folders are private to root)
        self.root = Path(tempfile.mkdtemp(prefix="ssa-tune-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.data, self.port = self.root / "data", free_port()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://root@127.0.0.1:{self.port}/test"

    def _as_postgres(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"

    def start(self) -> "PostgresServer":
        fresh = not self.data.exists()
        if fresh:
            self._as_postgres(self.bin / "initdb", "-D", self.data, "-U", "root", "--auth=trust", "-E", "UTF8",
                              "--no-sync")
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-o",
                          f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if fresh:
            self._as_postgres(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "root", "test")
        return self

    def restart(self) -> None:
        """`pg_ctl restart` (fast shutdown: every open connection is cut), then wait until it accepts again."""
        # -l: the restarted server writes to its log, not to this call's pipes (which would never close)
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "server.log", "-w", "-m", "fast",
                          "restart")
        wait_for(lambda: subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                         "-q"]).returncode == 0, 60, "PostgreSQL to accept connections")

    def halt(self) -> None:
        """Stop the server (fast shutdown), keeping its data: `start()` brings it back."""
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "-m", "fast", "stop")

    def stop(self) -> None:
        import shutil

        if (self.data / "postmaster.pid").exists():
            self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-w", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
