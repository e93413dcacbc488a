"""The private parts of Optuna, Ray and torch that ssa-tune uses, all in this one module: each is used only
where no public API does the job, and each was checked against the pinned versions (optuna 5.0.0, ray 2.60.0,
torch 2.13.0; see pyproject.toml and the Makefile). A new release of any of them is checked here first.
Nothing is imported at module level: the callers hand in the objects."""

from __future__ import annotations

from typing import Any


# ------------------------------------------------------------------------------------------------- Optuna
# A study's storage and id: ssa-tune claims a queued trial for one arm, writes a finished trial's attributes
# and its drivers' heartbeats through the storage (optuna.Study has no public way to do these); checked
# against optuna 5.0.0 (optuna/study/study.py: Study._storage, Study._study_id).


def storage_of(study) -> Any:
    return study._storage


def study_id_of(study) -> int:
    return study._study_id


def trial_id_of(trial) -> int:
    """The storage's id of an optuna.trial.Trial or FrozenTrial (optuna 5.0.0: `_trial_id` on both)."""
    return trial._trial_id


def forget_cached_trials(study) -> None:
    """After trials were created or changed through the storage: the study's per-thread cache of its trials
    (which the samplers read inside Study.ask) must not hide them (optuna 5.0.0: Study._thread_local
    .cached_all_trials, reset by Optuna itself after each tell)."""
    study._thread_local.cached_all_trials = None


# The storage methods Optuna's trial cache calls on the RDBStorage behind it: a Study puts
# optuna.storages._CachedStorage in front of every RDBStorage, and that cache reads and writes trials through
# these private methods, not through the public interface (checked against optuna 5.0.0,
# optuna/storages/_cached_storage.py: `self._backend.<name>`). A retrying storage must retry them too.
CACHED_STORAGE_BACKEND_CALLS = ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                                "_get_stale_trial_ids")


# -------------------------------------------------------------------------------------------------- torch


def tensor_version(t) -> int:
    """The counter torch bumps on every in-place change of a tensor (torch 2.13: Tensor._version; autograd's
    own check for tensors saved for backward). Caches keyed by it notice an optimiser step or a
    load_state_dict without comparing values."""
    return t._version


# ---------------------------------------------------------------------------------------------------- Ray


def dashboard_get(client, endpoint: str):
    """GET `endpoint` from a Ray cluster's dashboard through a JobSubmissionClient, with the client's address,
    headers, cookies and token (ray 2.60.0: JobSubmissionClient._do_request, from SubmissionClient). The node
    summary (`/nodes?view=summary`, which names the Python the head runs its workers with) has no public API."""
    return client._do_request("GET", endpoint)
