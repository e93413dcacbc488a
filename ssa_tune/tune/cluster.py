"""Connecting to Ray (a new local instance, or a cluster at an address), its alive nodes, and whether one
trial's resources fit any of them."""

from __future__ import annotations

import os
from typing import Any

from ..errors import UserError
from ..spec import JobSpec


def quiet_ray() -> None:
    """Our own progress lines replace Ray's tables and its end-of-run error banner."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    # Ctrl-C must interrupt the study (KeyboardInterrupt: the driver fails and re-queues its running trials,
    # stores no partial robustness stage, exits 130): Tune's own SIGINT handler would instead end `fit()`
    # normally, as if the budget were spent
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    for name in ("ray.tune", "ray.air", "ray.train", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def auth_from_token_file() -> None:
    """Use Ray's token authentication when a token is at hand (~/.ray/auth_token, $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH): Ray's clients only send it with RAY_AUTH_MODE=token, which nobody should have to
    export by hand. An explicit RAY_AUTH_MODE is left alone."""
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "/nonexistent").is_file() \
            or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def in_ray_job() -> bool:
    """True when this process is the entrypoint of a Ray job (`ssa-tune submit`)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


# The job's working dir as the entrypoint found it. Ray may unpack that folder again under the same path
# while the job runs (when several nodes share one disk), which leaves the process's cwd a deleted
# directory: everything that needs the folder uses this path, never os.getcwd().
_START_DIR = os.getcwd() if in_ray_job() else None


def job_dir() -> str:
    global _START_DIR
    if _START_DIR is None:
        _START_DIR = os.getcwd()
    return _START_DIR


def init_ray(address: str | None = None) -> None:
    """Connect to Ray: the cluster at `address` (or $RAY_ADDRESS, as inside a Ray job), else a new local one.

    A local run always starts its own instance (`address="local"`): a Ray cluster someone started on this
    machine must not silently take the study's trials."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    quiet_ray()
    if address != "local":
        auth_from_token_file()  # before Ray is imported: its C++ side reads RAY_AUTH_MODE once
    import ray

    if ray.is_initialized():
        return
    # inside a Ray job, Ray merges this with the job's own runtime env (its working dir with the spec and data)
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": "workers.setup.setup"}
    kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR",
                          "runtime_env": runtime_env}
    try:
        if address == "local":
            # no idle workers started with the instance (Ray's config, read from the environment by the processes
            # it starts; ray 2.60.0): a trial actor never takes one (Ray Tune gives it a runtime env of its
            # own), so they only cost CPU while the study starts (measured: ray.init 3.0 s -> 2.6 s)
            os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
            ray.init(address="local", include_dashboard=False, **kw)
        else:  # an existing cluster: no CPU/GPU counts may be given
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).strip().splitlines()[0]}", field="address") from None
    try:
        os.getcwd()
    except FileNotFoundError:  # inside a job Ray may unpack the working dir anew: step back into it
        os.chdir(job_dir())


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster: {"node_id", "ip", "resources"}."""
    import ray

    return [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"), "resources": dict(n.get("Resources", {}))}
            for n in ray.nodes() if n.get("Alive")]


def fmt_request(request: dict[str, float]) -> str:
    def one(k, v):
        return f"memory {v / 2**30:.3g} GiB" if k == "memory" else f"{k} {v:g}"

    return ", ".join(one(k, v) for k, v in sorted(request.items()))


def unfit_reason(request: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no node can ever hold one trial, or None when one can."""
    if any(all(n["resources"].get(k, 0.0) >= v - 1e-9 for k, v in request.items()) for n in nodes):
        return None
    have = "; ".join(f"{n['ip']}: {fmt_request({k: v for k, v in n['resources'].items() if k in request})}"
                     for n in nodes) or "no alive node"
    return f"one trial asks for {fmt_request(request)}, but no node of the cluster has that ({have})"


def check_resources(spec: JobSpec, nodes: list[dict[str, Any]] | None = None) -> None:
    """A trial no node can ever hold is one line, not a wait forever (unless the spec says the cluster
    autoscales: then the wait is watched and bounded while the study runs)."""
    if spec.resources.get("autoscale"):
        return
    reason = unfit_reason(spec.trial_resources(), cluster_nodes() if nodes is None else nodes)
    if reason:
        raise UserError(f"{reason}; lower resources.* or add a node (resources.autoscale: true to wait for one)",
                        spec.path, "resources")
