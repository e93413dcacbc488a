"""`ssa-tune`: the command line. User errors are caught here, once, and printed as one line with exit 2."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Tune Selective Self-Attention (SSA) per dataset: Optuna search, Ray Tune trials, MLflow tracking.")

Workdir = Annotated[Optional[str], typer.Option("--workdir", help="Work dir (default ./.ssa_tune or $SSA_TUNE_HOME).")]
Storage = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (SQLAlchemy).")]
Tracking = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _edge(fn):
    """Turn a UserError (or a config ValueError raised at the edge) into `error: ...`, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e.line()}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=_json_default))


def _target(spec=None, workdir=None, storage=None, tracking=None, study=None):
    from .driver import resolve_target

    return resolve_target(getattr(spec, "storage", None), getattr(spec, "tracking", None), workdir, storage,
                          tracking, study)


def _open(study: str | None, workdir, storage, tracking):
    """The study named (or the only one in the storage) and its target."""
    import optuna

    from . import study as st

    target = _target(None, workdir, storage, tracking, study)
    st.check_storage(target.storage)
    s = st.open_storage(target.storage, create=False)
    if not study:
        names = [x.study_name for x in optuna.get_all_study_summaries(s)]
        if len(names) != 1:
            raise UserError(f"name a study ({', '.join(names) if names else 'no studies here'})", field="STUDY")
        study = names[0]
    loaded = st.load_study(s, study)
    tracking_attr = loaded.user_attrs.get(st.ATTR_TRACKING)
    if tracking is None and tracking_attr:
        target.tracking = tracking_attr
    target.study = study
    return loaded, target


@app.command()
@_edge
def validate(spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
             set_: Annotated[Optional[list[str]], typer.Option("--set", help="dotted.key=value override")] = None):
    """Check a job spec; print a one-line summary."""
    from .spec import load_spec

    s = load_spec(spec, set_)
    names = [p.name for p in s.searched()]
    arms = " + ".join(f"{a} {n}" for a, n in s.arm_budgets().items())
    typer.echo(f"ok: {spec}: study {s.name}, dataset {s.dataset['kind']}, {s.n_trials} trials ({arms}), "
               f"{len(names)} searched parameters ({', '.join(names) or 'none'})")


@app.command()
@_edge
def train(spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
          set_: Annotated[Optional[list[str]], typer.Option("--set", help="dotted.key=value (e.g. train.lr=1e-3)")] = None,
          as_json: AsJson = False,
          cpus: Annotated[float, typer.Option(help="CPU threads for the trial.")] = float(os.cpu_count() or 1)):
    """Train one configuration of a spec with fixed values (no tuning) and print its metrics."""
    from .errors import TrialFailed
    from .spec import load_spec
    from .trial import execute

    s = load_spec(spec, set_)

    def report(m):
        line = f"step {int(m['step']):>6}  val_loss {m['val_loss']:.4f}  train_loss {m['train_loss']:.4f}  " \
               f"tok/s {m['tokens_per_s']:.0f}" + (f"  acc {m['val_acc']:.3f}" if "val_acc" in m else "")
        typer.echo(line, err=as_json)

    from .trial import local_gpus

    try:
        result = execute(s, {}, cpus, local_gpus(), report)
    except TrialFailed as e:
        typer.echo(f"error: {s.path}: trial failed: {e.reason}", err=True)
        raise typer.Exit(1)
    out = {**result.metrics, "steps": result.steps, "seconds": result.seconds, "n_params": result.n_params,
           "ssa_params": result.ssa_params}
    if as_json:
        typer.echo(json.dumps(out, default=_json_default))
    else:
        for k in ("val_loss", "val_acc", "val_gap", "passkey_acc", "test_loss", "tokens_per_s", "latency_ms_per_token",
                  "peak_mem_mb", "steps", "seconds"):
            if k in out:
                typer.echo(f"{k:>22}: {out[k]:.4f}" if isinstance(out[k], float) else f"{k:>22}: {out[k]}")


def _run_or_resume(s, target, resume: bool, trials, address, as_json: bool, deadline: float | None = None,
                   closing: bool = True, search_deadline: float | None = None):
    import signal

    def terminate(signum, frame):  # `ssa-tune jobs stop`, `kill`: stop like Ctrl-C, closing the running trials
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    say = (lambda m: typer.echo(m, err=True)) if as_json else typer.echo
    json_out = None
    if as_json and _stdout_is_fd1():
        # stdout is the one JSON object: whatever Ray prints goes to stderr with our progress lines
        sys.stdout.flush()
        json_out = os.dup(1)
        os.dup2(2, 1)
    try:
        summary, robust = _study_and_report(s, target, resume, trials, address, say, deadline, search_deadline)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if json_out is not None:  # the process's stdout as it was (the CLI may run inside another program)
            sys.stdout.flush()
            os.dup2(json_out, 1)
    if as_json:
        text = json.dumps(summary, indent=2, default=_json_default) + "\n"
        if json_out is not None:
            os.write(json_out, text.encode())
            os.close(json_out)
        else:
            typer.echo(text, nl=False)
        return summary, robust
    if closing:
        _closing_lines(s, target, summary, robust)
    return summary, robust


def _stdout_is_fd1() -> bool:
    """Whether sys.stdout writes to file descriptor 1 (not so when the CLI runs inside a program that captures
    its output, e.g. typer's CliRunner)."""
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, ValueError, OSError):
        return False


def _study_and_report(s, target, resume: bool, trials, address, say, deadline: float | None = None,
                      search_deadline: float | None = None) -> tuple[dict, dict | None]:
    """Run the study, then write its report when it has a robustness stage: (summary, robustness record)."""
    import optuna

    from . import study as st
    from .driver import run_study
    from .study import ATTR_ROBUSTNESS

    summary = run_study(s, target, resume=resume, n_trials=trials, address=address, out=say, deadline=deadline,
                        search_deadline=search_deadline)
    robust = None
    if s.robustness is not None and summary["trials"]["complete"]:
        loaded = optuna.load_study(study_name=summary["study"], storage=st.open_storage(target.storage))
        robust = loaded.user_attrs.get(ATTR_ROBUSTNESS)
        rep = _write_report(loaded, target, None, say)
        summary["report"] = rep.get("path")
        summary["verdict"] = (rep.get("verdict") or {}).get("answer")
        summary["decision"] = (rep.get("verdict") or {}).get("decision")
        summary["recommendation"] = ((rep.get("verdict") or {}).get("recommendation") or {}).get("text")
        summary["winner"] = rep.get("winner")
    return summary, robust


def _closing_lines(s, target, summary: dict, robust: dict | None) -> None:
    from . import study as st
    from .tune.cluster import in_ray_job

    c = summary["trials"]
    typer.echo(f"\nstudy {summary['study']}: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed")
    for arm, ac in summary["trials_by_arm"].items():
        b = summary["best_by_arm"].get(arm)
        best_txt = f"best #{b['number']} {s.objectives[0].metric} = {_num(b['value'])}" if b else \
            f"{len(summary['front_by_arm'].get(arm, []))} on its front" if "front" in summary else "no complete trial"
        typer.echo(f"  {arm:<8} {ac['complete']} complete, {ac['pruned']} pruned, {ac['failed']} failed; {best_txt}")
    best = summary["best"]
    if "front" in summary:
        _print_front(summary)
    if robust and robust.get("winner") in robust.get("configs", {}):
        w = robust["summary"][robust["winner"]]
        rule = robust.get("rule")
        how = (f"; search best was trial #{best['number']}" if best else
               f"; among the front members where {' and '.join(rule['where']) or 'anything'}, by {rule['pick']}" if rule
               else "")
        typer.echo(f"winner {robust['winner']} (robust score over {w['seeds']} fresh seeds): "
                   f"{robust['objective']} {w['mean']:.4f} +- {w['std']:.4f}{how}")
        for k, v in robust["configs"][robust["winner"]].items():
            typer.echo(f"  {k}: {v}")
    elif best:
        typer.echo(f"best trial #{best['number']} ({best['arm']}): {s.objectives[0].metric} = {_num(best['value'])}")
        for k, v in best["params"].items():
            typer.echo(f"  {k}: {v}")
    if summary.get("verdict"):
        typer.echo(f"verdict: {summary['verdict']}")
        if summary.get("recommendation"):
            typer.echo(f"recommendation: {summary['recommendation']}")
    where = ""
    if target.workdir != Path(".ssa_tune").resolve() and not in_ray_job():
        where = f" --workdir {target.workdir}"
    elif in_ray_job():
        where = f" --storage {st.redact(target.storage)} --tracking-uri {st.redact(target.tracking)}"
    typer.echo(f"\nexport: ssa-tune export {summary['study']} -o best.yaml{where}")
    if summary.get("mlflow_ui"):
        typer.echo(f"MLflow UI: {summary['mlflow_ui']}")
    else:
        typer.echo(f"MLflow UI: ssa-tune ui{where}   (or: mlflow ui --backend-store-uri {st.redact(target.tracking)})")


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_front(summary: dict) -> None:
    objectives = summary["objectives"]
    typer.echo(f"Pareto front ({', '.join(objectives)}): {len(summary['front'])} trial(s)")
    for m in summary["front"]:
        typer.echo(f"  #{m['number']:<3} {m['arm']:<8} " + "  ".join(f"{k}={_num(v)}" for k, v in m["values"].items()))


@app.command()
@_edge
def run(spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
        trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Override budget.n_trials.")] = None,
        workdir: Workdir = None, study: Annotated[Optional[str], typer.Option("--study", help="Study name.")] = None,
        storage: Storage = None, tracking_uri: Tracking = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="dotted.key=value override")] = None,
        address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster (GCS) address; default: a local Ray.")] = None,
        as_json: AsJson = False):
    """Run a tuning study: Optuna search, trials on Ray Tune, every trial logged to MLflow."""
    from .spec import load_spec

    s = load_spec(spec, set_)
    target = _target(s, workdir, storage, tracking_uri, study)
    _run_or_resume(s, target, False, trials, address, as_json)


@app.command()
@_edge
def submit(spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
           address: Annotated[Optional[str], typer.Option("--address", help="Ray Jobs address, e.g. http://head:8265 (default $RAY_ADDRESS).")] = None,
           trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Override budget.n_trials.")] = None,
           study: Annotated[Optional[str], typer.Option("--study", help="Study name.")] = None,
           storage: Storage = None, tracking_uri: Tracking = None,
           set_: Annotated[Optional[list[str]], typer.Option("--set", help="dotted.key=value override")] = None,
           workdir: Annotated[Optional[str], typer.Option("--workdir", help="Work dir on the cluster (default: the job's own).")] = None,
           shared: Annotated[Optional[list[str]], typer.Option("--shared-path", help="A folder every node mounts; data under it is not shipped.")] = None,
           wait: Annotated[bool, typer.Option("--wait", help="Follow the job's log until it ends.")] = False):
    """Submit a study to a Ray cluster (Ray Jobs); its trials share a PostgreSQL study and an MLflow server."""
    from .jobs import submit as submit_job
    from .spec import load_spec

    s = load_spec(spec, set_)  # validated here, before anything reaches the cluster
    storage = storage or s.storage
    tracking_uri = tracking_uri or s.tracking
    if storage is None or storage.startswith("sqlite"):
        raise UserError("a cluster study needs a shared storage URL (e.g. postgresql://...)", str(spec), "storage")
    if tracking_uri is None or not tracking_uri.startswith(("http://", "https://")):
        raise UserError("a cluster study needs an MLflow tracking server URI (http://...)", str(spec), "tracking")
    submit_job(s, address, storage=storage, tracking=tracking_uri, study=study, trials=trials, workdir=workdir,
               shared=shared or [], wait=wait, out=typer.echo)


jobs_app = typer.Typer(no_args_is_help=True, help="Ray jobs of a cluster: list, status, logs, stop.")
app.add_typer(jobs_app, name="jobs")
Address = Annotated[Optional[str], typer.Option("--address", help="Ray Jobs address (default $RAY_ADDRESS).")]


@jobs_app.command("list")
@_edge
def jobs_list(address: Address = None, all_jobs: Annotated[bool, typer.Option("--all", help="Every job, not only ssa-tune's.")] = False,
              as_json: AsJson = False):
    """The cluster's ssa-tune jobs, newest first."""
    from . import jobs

    rows = jobs.list_jobs(jobs.client(address), all_jobs)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['id']}\t{r['status']}\t{r['study'] or '-'}")


@jobs_app.command("status")
@_edge
def jobs_status(job: Annotated[str, typer.Argument(help="Job id.")], address: Address = None, as_json: AsJson = False):
    """One job's status."""
    from . import jobs

    row = jobs.status(jobs.client(address), job)
    if as_json:
        _print_json(row)
        return
    msg = f" ({row['message'][0]})" if row["message"] else ""
    typer.echo(f"{row['id']}: {row['status']}{msg}; study {row['study'] or '-'}")


@jobs_app.command("logs")
@_edge
def jobs_logs(job: Annotated[str, typer.Argument(help="Job id.")], address: Address = None,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False):
    """A job's log (its study's progress lines)."""
    from . import jobs

    c = jobs.client(address)
    if follow:
        jobs.follow(c, job, typer.echo)
    else:
        typer.echo(jobs.logs(c, job), nl=False)


@jobs_app.command("stop")
@_edge
def jobs_stop(job: Annotated[str, typer.Argument(help="Job id.")], address: Address = None):
    """Stop a job: its driver marks its running trials FAIL (re-run by `ssa-tune resume`)."""
    from . import jobs

    typer.echo(f"{job}: {jobs.stop(jobs.client(address), job)}")


@app.command()
@_edge
def poc(model: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX) with its tokenizer.")],
        data: Annotated[Optional[Path], typer.Argument(help="Text file or folder of text (default: the built-in Shakespeare corpus).")] = None,
        time_: Annotated[str, typer.Option("--time", help="Time for all of it: probe, study, report, exports (e.g. 30m, 1h, 1h30m).")] = "30m",
        out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the spec, study, report and exports (default ./poc-MODEL).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Probe, print the plan and the spec; start no study.")] = False,
        layers: Annotated[Optional[int], typer.Option("--layers", help="Top layers that get SSA (default: a quarter of them, at most 4).")] = None,
        seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Training sequence length (default: 128, or the checkpoint's positions if fewer).")] = None,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps of every run (default: planned from --time).")] = None,
        trials: Annotated[Optional[int], typer.Option("--trials", help="Search trials per arm (default: planned from --time).")] = None,
        address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster (GCS) address for the study; default: a local Ray.")] = None):
    """Is SSA worth it for my model? Probe the checkpoint and data here, plan a two-arm study that fits --time,
    run it, write the report and export both arms with the decision."""
    import time

    from . import poc as pc
    from .spec import load_spec

    started = time.monotonic()
    budget = pc.parse_time(time_)
    prep = pc.prepare(model, data, budget, out, layers, seq_len, started, typer.echo, for_run=not dry_run,
                      steps=steps, address=address, trials=trials)
    typer.echo("plan:")
    for line in pc.describe(prep.plan, prep.measured):
        typer.echo(f"  {line}")
    if prep.more is not None:
        m = prep.more
        typer.echo(f"  with --time {pc.clock(2 * budget)}: {m.steps} steps a run, {m.trials_per_arm} trial(s) per arm, "
                   f"up to {m.confirm_max} seed pairs")
    text = pc.spec_text(prep, budget)
    spec_file = prep.out_dir / f"{prep.name}.yaml"
    if dry_run:
        typer.echo(f"spec (not written; without --dry-run it goes to {spec_file}):")
        typer.echo(text, nl=False)
        return
    prep.out_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(text)
    typer.echo(f"spec: {spec_file}  (re-run: ssa-tune run {spec_file} --workdir DIR)")
    s = load_spec(spec_file, check_data=False)  # (the probe has read the data)
    target = _target(s, str(prep.out_dir), None, None, None)
    t_study = time.monotonic()
    study_end, search_end = pc.deadlines(prep.plan, started)
    summary, robust = _run_or_resume(s, target, False, None, address, False, deadline=study_end, closing=False,
                                     search_deadline=search_end)
    t_exports = time.monotonic()
    exports = pc.export_arms(summary["study"], target, prep.out_dir, typer.echo)
    done = time.monotonic()
    record = pc.record(prep, budget, summary, robust, exports,
                       {"probe": t_study - started, "study": t_exports - t_study, "exports": done - t_exports,
                        "total": done - started})
    typer.echo("")
    for line in pc.closing(record):
        typer.echo(line)


@app.command()
@_edge
def resume(study: Annotated[str, typer.Argument(help="Study name.")], workdir: Workdir = None,
           storage: Storage = None, tracking_uri: Tracking = None,
           address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address.")] = None,
           as_json: AsJson = False):
    """Continue an interrupted study to its budget (killed trials are marked FAIL and re-run)."""
    from . import study as st
    from .spec import validate as validate_spec

    loaded, target = _open(study, workdir, storage, tracking_uri)
    raw = st.study_spec(loaded)
    s = validate_spec(raw, loaded.user_attrs.get(st.ATTR_SPEC_PATH, study), check_data=False)
    _run_or_resume(s, target, True, loaded.user_attrs.get(st.ATTR_N_TRIALS), address, as_json)


@app.command()
@_edge
def status(study: Annotated[Optional[str], typer.Argument(help="Study name.")] = None, workdir: Workdir = None,
           storage: Storage = None, tracking_uri: Tracking = None, as_json: AsJson = False):
    """Trial counts per arm, the best trial of each, running drivers, and anything waiting."""
    from .driver import status as study_status

    loaded, target = _open(study, workdir, storage, tracking_uri)
    summary = study_status(loaded, target)
    if as_json:
        _print_json(summary)
        return
    c = summary["trials"]
    typer.echo(f"study {summary['study']} ({summary['storage']})")
    typer.echo("  " + ", ".join(f"{v} {k}" for k, v in c.items()) + f" of budget {summary['n_trials']}")
    for arm, ac in summary["trials_by_arm"].items():
        b = summary["best_by_arm"].get(arm)
        typer.echo(f"  {arm:<8} " + ", ".join(f"{v} {k}" for k, v in ac.items())
                   + (f"; best #{b['number']}: {_num(b['value'])}  {b['params']}" if b else ""))
    if "front" in summary:
        _print_front(summary)
    for d in summary["drivers"]:
        typer.echo(f"  running: driver pid {d['pid']} on {d['host']}")
    w = summary["waiting_for_resources"]
    if w:
        import datetime

        since = datetime.datetime.fromtimestamp(w["since"]).strftime("%H:%M:%S")
        typer.echo(f"  waiting for resources since {since}: {w['pending']} trial(s) ask {w['asks']}")
    v = summary.get("verdict")
    if v:
        typer.echo(f"  verdict: {v['answer']}")
        if v.get("recommendation"):
            typer.echo(f"  recommendation: {v['recommendation']}")
    if summary["mlflow_pending"]:
        typer.echo(f"  MLflow: not yet mirrored: {', '.join(summary['mlflow_pending'])} "
                   f"(ssa-tune sync {summary['study']} re-sends them)")


@app.command()
@_edge
def sync(study: Annotated[str, typer.Argument(help="Study name.")], workdir: Workdir = None,
         storage: Storage = None, tracking_uri: Tracking = None):
    """Send to MLflow what earlier drivers could not (the tracking server was away when they ended)."""
    from .driver import sync as sync_study

    loaded, target = _open(study, workdir, storage, tracking_uri)
    res = sync_study(loaded, target)
    left = f"; still pending: {', '.join(res['still_pending'])}" if res["still_pending"] else ""
    typer.echo(f"mlflow: sent {res['sent']} write(s){left}")
    if res["still_pending"]:
        raise typer.Exit(1)


@app.command()
@_edge
def best(study: Annotated[str, typer.Argument(help="Study name.")], workdir: Workdir = None,
         storage: Storage = None, tracking_uri: Tracking = None, as_json: AsJson = False):
    """The best trial: number, arm, value, params and its last metrics."""
    from . import study as st

    loaded, target = _open(study, workdir, storage, tracking_uri)
    if len(loaded.directions) > 1:  # several objectives: the front is the answer
        from .driver import status as study_status

        summary = study_status(loaded, target)
        if not summary["front"]:
            raise UserError(f"study {loaded.study_name!r} has no complete trial yet", field="STUDY")
        if as_json:
            _print_json({"objectives": summary["objectives"], "front": summary["front"]})
        else:
            _print_front(summary)
        return
    t = st.best_trial(loaded)
    if t is None:
        raise UserError(f"study {loaded.study_name!r} has no complete trial yet", field="STUDY")
    metrics = _run_metrics(target.tracking, st.run_id(loaded, t))
    out = {"number": t.number, "arm": st.arm_of(t), "value": t.value if len(t.values) == 1 else t.values,
           "params": dict(t.params), "metrics": metrics}
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"best trial #{t.number} ({out['arm']}): {out['value']}")
        for k, v in out["params"].items():
            typer.echo(f"  {k}: {v}")


def _run_metrics(tracking: str, run_id: str | None) -> dict:
    if not run_id:
        return {}
    from .track import _client

    try:
        return dict(_client(tracking).get_run(run_id).data.metrics)
    except Exception:
        return {}


@app.command()
@_edge
def studies(workdir: Workdir = None, storage: Storage = None, as_json: AsJson = False):
    """List the studies in the storage."""
    import optuna

    from . import study as st

    target = _target(None, workdir, storage, None, None)
    st.check_storage(target.storage)
    s = st.open_storage(target.storage, create=False)
    rows = []
    for summ in optuna.get_all_study_summaries(s):
        best = summ.best_trial.value if summ.best_trial is not None and len(summ.directions) == 1 else None
        rows.append({"study": summ.study_name, "n_trials": summ.n_trials, "best": best})
    if as_json:
        _print_json(rows)
    else:
        for r in rows:
            typer.echo(f"{r['study']}\t{r['n_trials']} trials\tbest {r['best']}")


@app.command()
@_edge
def export(study: Annotated[str, typer.Argument(help="Study name.")],
           output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
           fmt: Annotated[Optional[str], typer.Option("--format", help="yaml or json (default: by suffix).")] = None,
           where: Annotated[Optional[list[str]], typer.Option("--where", help="A condition the winner must meet, e.g. \"latency_ms_per_token <= 0.6\" (repeatable).")] = None,
           pick: Annotated[Optional[str], typer.Option("--pick", help="Among those, the best by this metric (max:METRIC / min:METRIC to say which way).")] = None,
           arm: Annotated[Optional[str], typer.Option("--arm", help="ssa or baseline: that arm's best, whichever won (e.g. the SSA settings to try elsewhere).")] = None,
           workdir: Workdir = None, storage: Storage = None, tracking_uri: Tracking = None):
    """Write the best configuration: its SSAConfig plus the model/training settings and metrics it was measured with.

    With --where/--pick (or the spec's `select:`), the winner is chosen by that rule, from the Pareto front of a
    multi-objective study. With --arm, among that arm's configurations only."""
    from . import study as st
    from .export import export_best
    from .selection import make_rule
    from .spec import validate as validate_spec

    if fmt is not None and fmt not in ("yaml", "json"):
        raise UserError(f"must be yaml or json, got {fmt!r}", field="--format")
    loaded, target = _open(study, workdir, storage, tracking_uri)
    rule = None
    if where or pick:
        s = validate_spec(st.study_spec(loaded), loaded.user_attrs.get(st.ATTR_SPEC_PATH, study), check_data=False)
        try:
            rule = make_rule(s, where, pick)
        except ValueError as e:
            raise UserError(str(e).split(": ", 1)[1], field="--where") from None
    if fmt is not None and output.suffix.lower() not in (f".{fmt}", ".yml" if fmt == "yaml" else ".json"):
        output = output.with_suffix(f".{fmt}")
    path, info = export_best(loaded, target, output, rule, arm)
    typer.echo(f"wrote {path}: trial #{info['trial']} ({info['winner']}, {info['selected_by']}); "
               f"use: ssa_tune.convert(model, ssa_tune.load_config({str(path)!r}))")


@app.command()
@_edge
def robustness(study: Annotated[str, typer.Argument(help="Study name.")], workdir: Workdir = None,
               storage: Storage = None, tracking_uri: Tracking = None,
               address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address.")] = None,
               report_dir: Annotated[Optional[Path], typer.Option("--report", help="Also write the report here.")] = None):
    """Re-train the study's top configs and each arm's best with fresh seeds; pick the robust winner; confirm."""
    from . import study as st
    from .driver import run_study
    from .spec import validate as validate_spec

    loaded, target = _open(study, workdir, storage, tracking_uri)
    s = validate_spec(st.study_spec(loaded), loaded.user_attrs.get(st.ATTR_SPEC_PATH, study), check_data=False)
    run_study(s, target, resume=True, n_trials=loaded.user_attrs.get(st.ATTR_N_TRIALS), address=address,
              out=typer.echo, robustness="always")
    if report_dir is not None:
        _write_report(loaded, target, report_dir)


def _write_report(loaded, target, out_dir: Path | None, say=typer.echo) -> dict:
    """Write the report (to WORKDIR/reports/STUDY by default) and attach it to the study's MLflow run.
    Inside a Ray job the job's folder is temporary: the MLflow run is where the report stays."""
    import tempfile

    from .report import build, log_to_mlflow
    from .tune.cluster import in_ray_job

    temporary = out_dir is None and in_ray_job()
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="ssa-tune-report-")) if temporary else \
            target.workdir / "reports" / loaded.study_name
    out_dir = out_dir.resolve()
    rep = build(loaded, target, out_dir)
    where = log_to_mlflow(loaded, target, out_dir, rep)
    pngs = ", ".join(f for f in rep["files"] if f.endswith(".png"))
    if temporary:
        say(f"report: in MLflow, artifacts report/ of the study's run{f' ({where})' if where else ''}; "
            f"`ssa-tune report {loaded.study_name} --storage ... --tracking-uri ...` writes it locally")
        rep["path"] = where
    else:
        say(f"report: {out_dir / 'report.html'} (+ report.json, {pngs}); logged to the study's MLflow run")
        rep["path"] = str(out_dir / "report.html")
    return rep


@app.command()
@_edge
def report(study: Annotated[str, typer.Argument(help="Study name.")],
           output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Folder (default WORKDIR/reports/STUDY).")] = None,
           workdir: Workdir = None, storage: Storage = None, tracking_uri: Tracking = None):
    """Write the study report (HTML, JSON, PNGs): importances, robustness, long-range guard, SSA verdict."""
    loaded, target = _open(study, workdir, storage, tracking_uri)
    _write_report(loaded, target, output or target.workdir / "reports" / loaded.study_name)


@app.command()
@_edge
def ui(workdir: Workdir = None, tracking_uri: Tracking = None,
       port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 5000,
       host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1"):
    """Start the MLflow UI over the study's tracking store and print its URL."""
    import subprocess

    target = _target(None, workdir, None, tracking_uri, None)
    if target.tracking.startswith(("http://", "https://")):
        from .redact import redact

        typer.echo(f"the tracking server is already a UI: {redact(target.tracking)}")
        return
    artifacts = target.workdir / "mlartifacts"
    # -P: the current directory must not shadow modules mlflow imports
    cmd = [sys.executable, "-P", "-m", "mlflow", "server", "--backend-store-uri", target.tracking,
           "--default-artifact-root", artifacts.resolve().as_uri(), "--host", host, "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    typer.echo(f"MLflow UI: http://{host}:{port}  (Ctrl-C to stop)")
    import signal

    def stop(signum, frame):  # `kill`, a service manager: end like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    # run from the work dir: a stray module in the current directory must not shadow what the server imports.
    # A session of its own: the server and its uvicorn workers are one process group, ended with this command
    proc = subprocess.Popen(cmd, env=env, cwd=target.workdir if target.workdir.is_dir() else None,
                            start_new_session=True)
    code = 0
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _end_group(proc)
    raise typer.Exit(code)


def _end_group(proc) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL to whatever is left of it after 10 s."""
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; its workers may not be
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def main() -> None:
    app()


if __name__ == "__main__":
    main()
