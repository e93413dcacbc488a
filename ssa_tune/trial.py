"""What one tuning trial does on a worker: configs from the sampled params, train, stream metrics.

`report` is handed in (Ray Tune's `tune.report` under the tuner, `print` under `ssa-tune train`), so this
module imports neither Ray, Optuna nor MLflow: a worker reports to the driver, and the driver records.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import traceback
from typing import Any, Callable

from .config import SSAConfig
from .errors import TrialFailed
from .spec import SSA_SWITCH, JobSpec

# keys the driver adds to a trial's config next to the sampled params
KEY_NUMBER, KEY_TRIAL_ID, KEY_ARM = "ssa_tune.trial_number", "ssa_tune.optuna_trial_id", "ssa_tune.arm"


@functools.lru_cache(maxsize=4)
def _dataset(spec_json: str, seed: int):
    """Reused across trials in one worker process (reuse_actors): text corpora are read and tokenised once."""
    from .data import build_dataset

    return build_dataset(json.loads(spec_json), seed=seed)


def dataset_for(dataset_spec: dict[str, Any], train_seed: int):
    """The trial's dataset, built once per worker for the same data and evaluation seed. A dataset's splits,
    evaluation batches and probes come from its evaluation seed (`eval_seed`, else the seed it is built with);
    training batches come from the trial's own generator. So trials that differ only in their training seed
    (the robustness stage's seeds, with the study's `eval_seed`) share one build."""
    es = dataset_spec.get("eval_seed")
    return _dataset(json.dumps(dataset_spec, sort_keys=True), train_seed if es is None else int(es))


def trial_params(dataset: dict, model, train, ssa: SSAConfig | None) -> dict[str, Any]:
    """Every setting of a trial as flat dotted params (what MLflow shows and `ssa-tune train --set` takes):
    model.kind says gpt or hf, and a Hugging Face trial's model.path names its checkpoint."""
    out: dict[str, Any] = {f"dataset.{k}": v for k, v in dataset.items()}
    out.update({f"model.{k}": v for k, v in model.to_dict().items()})
    out.update({f"train.{k}": v for k, v in train.to_dict().items()})
    out[SSA_SWITCH] = ssa is not None
    if ssa is not None:
        out.update({f"ssa.{k}": v for k, v in ssa.to_dict().items()})
        out["ssa.position_init"] = ssa.beta_init
    return out


def local_gpus() -> float:
    """GPUs a trial run outside Ray (`ssa-tune train`) may use: one when this machine has a CUDA device."""
    try:
        import torch
    except ImportError:
        return 0.0
    return 1.0 if torch.cuda.is_available() else 0.0


def configure(spec: JobSpec, params: dict[str, Any], cpus: float, gpus: float):
    """The frozen configs of a trial, with threads and device set from its resources."""
    dataset, model, train, ssa = spec.trial_config(params)
    device = train.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    threads = train.threads or max(1, int(cpus))
    return dataset, model, dataclasses.replace(train, device=device, threads=threads), ssa


def execute(spec: JobSpec, params: dict[str, Any], cpus: float, gpus: float, report: Callable[[dict], None]):
    """Train one configuration; every evaluation goes to `report`."""
    from .train import train

    dataset_spec, model_cfg, train_cfg, ssa = configure(spec, params, cpus, gpus)
    dataset = dataset_for(dataset_spec, train_cfg.seed)
    # a baseline trial with `train.freeze: below` trains the layers the spec's ssa.layers selects
    try:
        return train(dataset, model_cfg, train_cfg, ssa, on_eval=report, freeze_layers=spec.freeze_layers())
    finally:
        if train_cfg.device.startswith("cuda"):
            # a reused worker (reuse_actors) runs the next trial in this process, maybe beside other trials on
            # the same GPU (fractional GPUs): hand this trial's cached blocks back to the device
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


def failure_reason(e: BaseException) -> str:
    if isinstance(e, TrialFailed):
        return e.reason
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"
