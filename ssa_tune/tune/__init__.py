"""Ray: the cluster connection, what a trial asks of it, and Ray Tune executing the trials of an Optuna study.

Every Ray Tune and Ray core call of the study is in this package (Ray's API moves between releases; the
version is pinned); job submission is `jobs.py`. One concern a module, lowest first:

- `trainable`: what runs on a worker (one trial, reporting to the driver); imports neither Optuna nor MLflow,
  so a worker's first trial does not wait for them
- `cluster`: connecting to Ray (a local instance or a cluster), its nodes, whether a trial fits one
- `scheduler`: early stopping within each arm (one Ray scheduler per arm)
- `progress`: the live lines, and the bounded wait for resources
- `searcher`: Ray Tune's searcher on the Optuna study (and the robustness stage's runs after it)
- `run`: `fit`, which puts them together

Early stopping has one owner, the Ray scheduler (ASHA by default, one instance per arm so arms never stop
each other's trials); Optuna's own pruner is off, and a trial the scheduler stopped is told to Optuna as
PRUNED. Workers never write to the study or to MLflow: they report to the driver, which tells Optuna and feeds
the MLflow mirror. Nothing is imported here, so that a worker importing `trainable` loads nothing else.
"""
