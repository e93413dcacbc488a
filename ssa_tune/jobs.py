"""Ray Jobs: `ssa-tune submit` and `ssa-tune jobs list|status|logs|stop`.

A submitted study is `python -m ssa_tune run spec.yaml ...` run by the cluster's own Python (the interpreter
the cluster runs its workers with, read from the head node, so nothing has to be on the head's PATH) in a
working dir made for the job: the validated spec (overrides applied) plus the data it reads, unless that
data is declared shared by the cluster (`--shared-path`). Secrets in storage / tracking URLs travel in that
spec file, never in the entrypoint (which the Ray dashboard shows).

Ray's token authentication: the client sends the token Ray keeps in ~/.ray/auth_token (or $RAY_AUTH_TOKEN,
$RAY_AUTH_TOKEN_PATH) whenever one is present; nothing has to be exported by hand.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .compat import dashboard_get
from .errors import UserError
from .spec import JobSpec
from .tune.cluster import auth_from_token_file

# Ray uploads a job's working dir through GCS, whose messages are capped (ray_constants.GRPC_CPP_MAX_MESSAGE_SIZE,
# 512 MiB, overridable with RAY_max_grpc_message_size); Ray warns from half of that. We refuse above the cap.
RUNTIME_ENV_LIMIT = int(os.environ.get("RAY_max_grpc_message_size", 512 * 1024 * 1024))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str | None):
    """A Ray Jobs client for the dashboard at `address` (or $RAY_ADDRESS when it is an http URL)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith(("http://", "https://")):
        raise UserError("give the cluster's dashboard address, e.g. --address http://head:8265 (or set RAY_ADDRESS)",
                        field="--address")
    auth_from_token_file()
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        logging.getLogger(name).setLevel(logging.ERROR)  # not its "Uploading package" lines; errors are ours

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, an authentication error
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {_first(e)}", field="--address") from None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------- the cluster


def _get(c, endpoint: str) -> Any:
    r = dashboard_get(c, endpoint)
    if r.status_code != 200:
        raise UserError(f"the cluster's dashboard answered {r.status_code} to {endpoint}", field="--address")
    return r.json()


def _literal(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def cluster_info(c) -> dict[str, Any]:
    """The alive nodes with their resources (Ray's State API), and the Python the head node runs its workers
    with (the raylet's command line in the dashboard's node summary)."""
    result = _get(c, "/api/v0/nodes?detail=1&limit=10000")["data"]["result"]["result"]
    nodes = [{"node_id": n["node_id"], "ip": n.get("node_ip"), "name": n.get("node_name"),
              "resources": {k: float(v) for k, v in (n.get("resources_total") or {}).items()}}
             for n in result if n.get("state") == "ALIVE"]
    python = None
    for s in _get(c, "/nodes?view=summary")["data"]["summary"]:
        if str((s.get("raylet") or {}).get("isHeadNode")) != "True":
            continue
        for arg in _literal(s.get("cmdline")) or []:
            if isinstance(arg, str) and arg.startswith("--python_worker_command="):
                python = arg.split("=", 1)[1].split()[0]
    return {"nodes": nodes, "python": python}


# ------------------------------------------------------------------------------------------- submitting


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _ship(spec: JobSpec, staging: Path, shared: list[str], file: str) -> dict[str, str]:
    """Copy the data the spec reads into the job's working dir, unless it lies under a shared path; returns
    {dotted key: path as the job sees it}."""
    out, total = {}, 0
    for key, value in spec.local_paths().items():
        p = Path(value)
        if any(p.is_relative_to(Path(s).expanduser().resolve()) for s in shared):
            out[key] = str(p)  # the same path on every node
            continue
        size = _size(p)
        total += size
        if total > RUNTIME_ENV_LIMIT:
            raise UserError(f"{value}: {size / 2**20:.0f} MiB is too large to ship with the job (Ray's runtime-env "
                            f"limit is {RUNTIME_ENV_LIMIT / 2**20:.0f} MiB in all); put it where every node mounts it "
                            f"and pass --shared-path DIR", file, key)
        dest = staging / "data" / key.replace(".", "_") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, dest)
        else:
            shutil.copy2(p, dest)
        out[key] = str(dest.relative_to(staging))
    return out


# A head node that has just started answers the job API before its job agent is up ("No available agent to
# submit job, please try again later"): submit waits this long for it ($SSA_TUNE_JOB_AGENT_WAIT_S)
AGENT_WAIT_S = 60.0
AGENT_WAIT_ENV = "SSA_TUNE_JOB_AGENT_WAIT_S"


def agent_wait_s() -> float:
    raw = os.environ.get(AGENT_WAIT_ENV, "").strip()
    try:
        wait = float(raw) if raw else AGENT_WAIT_S
    except ValueError:
        wait = -1.0
    if not wait >= 0:
        raise UserError(f"must be a number of seconds >= 0 (how long submit waits for a head's job agent), "
                        f"got {raw!r}", field=AGENT_WAIT_ENV)
    return wait


def submit(spec: JobSpec, address: str, *, storage: str, tracking: str, study: str | None, trials: int | None,
           workdir: str | None, shared: list[str], wait: bool, out: Callable[[str], None] = print) -> str:
    """Submit `ssa-tune run` of the spec as a Ray job; with `wait`, follow its log to the end."""
    from . import study as st
    from .track import check_tracking
    from .tune.cluster import unfit_reason

    wait = agent_wait_s()
    c = client(address)
    try:
        info = cluster_info(c)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - an authentication error, a dashboard without the nodes view
        raise UserError(f"cannot read the cluster at {address}: {_first(e)}", field="--address") from None
    if not spec.resources.get("autoscale"):
        reason = unfit_reason(spec.trial_resources(), info["nodes"])
        if reason:
            raise UserError(f"{reason}; lower resources.* or add a node (resources.autoscale: true to wait for one)",
                            spec.path, "resources")
    st.check_storage(storage)
    check_tracking(tracking)
    staging = Path(tempfile.mkdtemp(prefix="ssa-tune-job-"))
    try:
        raw = {**spec.raw, "storage": storage, "tracking": tracking}
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
        for key, value in _ship(spec, staging, shared, spec.path).items():
            section, field = key.split(".")
            raw[section][field] = value
        (staging / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        python = info["python"] or "python3"
        parts = [python, "-m", "ssa_tune", "run", "spec.yaml"]
        for flag, value in (("--study", study), ("--trials", trials), ("--workdir", workdir)):
            if value is not None:
                parts += [flag, str(value)]
        entrypoint = " ".join(shlex.quote(p) for p in parts)
        name = study or spec.name
        submission_id = f"ssa-tune-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        deadline = time.monotonic() + wait
        while True:
            try:
                job_id = c.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(staging)},
                                      submission_id=submission_id,
                                      metadata={"ssa_tune.study": name, "ssa_tune.spec": Path(spec.path).name})
                break
            except Exception as e:  # noqa: BLE001 - a head that just started has no job agent yet: wait for it
                if "no available agent" not in str(e).lower():
                    raise
                if time.monotonic() > deadline:
                    raise UserError(f"the cluster has no job agent to take the job (waited {wait:g} s; the head's "
                                    f"dashboard_agent.log says why: e.g. its agent port was taken)",
                                    field="--address") from None
                time.sleep(1.0)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's upload or submit failed
        raise UserError(f"the cluster refused the job: {_first(e)}", field="--address") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out(f"submitted {job_id}: study {name} on {address} ({st.redact(storage)}, tracking {st.redact(tracking)})")
    out(f"follow: ssa-tune jobs logs {job_id} --follow --address {address}")
    if wait:
        follow(c, job_id, out)
        status = c.get_job_status(job_id).value
        out(f"{job_id}: {status}")
        if status != "SUCCEEDED":
            raise UserError(f"job {job_id} ended {status}; see `ssa-tune jobs logs {job_id} --address {address}`",
                            field="job")
    return job_id


# ------------------------------------------------------------------------------------------- job control


def _info(c, job_id: str):
    try:
        return c.get_job_info(job_id)
    except Exception as e:  # noqa: BLE001 - RuntimeError("Request failed with status code 404 ...")
        raise UserError(f"no job {job_id!r} on this cluster ({_first(e)})", field="JOB") from None


def job_row(j) -> dict[str, Any]:
    meta = j.metadata or {}
    return {"id": j.submission_id or j.job_id, "status": j.status.value, "study": meta.get("ssa_tune.study"),
            "start": j.start_time, "end": j.end_time, "message": (j.message or "").strip().splitlines()[-1:] or None,
            "entrypoint": j.entrypoint}


def list_jobs(c, all_jobs: bool = False) -> list[dict[str, Any]]:
    """The cluster's ssa-tune jobs (every job with `all_jobs`), newest first."""
    rows = [job_row(j) for j in c.list_jobs() if all_jobs or (j.metadata or {}).get("ssa_tune.study")]
    return sorted(rows, key=lambda r: r["start"] or 0, reverse=True)


def status(c, job_id: str) -> dict[str, Any]:
    return job_row(_info(c, job_id))


def logs(c, job_id: str) -> str:
    _info(c, job_id)
    return c.get_job_logs(job_id)


def follow(c, job_id: str, out: Callable[[str], None] = print) -> None:
    """Print the job's log as it grows, until the job ends."""
    import asyncio

    _info(c, job_id)

    async def tail():
        buffer = ""
        async for chunk in c.tail_job_logs(job_id):
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                out(line)
        if buffer:
            out(buffer)

    asyncio.run(tail())


def stop(c, job_id: str, timeout: float = 60.0) -> str:
    """Ask the job to stop (SIGTERM to its driver, then SIGKILL) and wait for it to end; returns its status."""
    _info(c, job_id)
    c.stop_job(job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = c.get_job_status(job_id).value
        if s in TERMINAL:
            return s
        time.sleep(1.0)
    return c.get_job_status(job_id).value
