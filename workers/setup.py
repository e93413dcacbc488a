"""Worker process set-up, run once per Ray worker process before any trial (worker_process_setup_hook)."""

from __future__ import annotations

import logging
import os
import warnings


def setup() -> None:
    # A trial sets torch's thread count from its CPU share; BLAS pools started before that must not
    # oversubscribe the cores shared by concurrent trials.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    warnings.filterwarnings("ignore", message=".*ExperimentalWarning.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # what every trial needs, imported once per worker process before its first trial is scheduled
    import torch  # noqa: F401

    import ssa_tune.data  # noqa: F401
    import ssa_tune.train  # noqa: F401
    # workers report to the driver only: neither Optuna nor MLflow is imported here
