"""The dataset interface, its error type, parameter checking and seeding helpers.

Every dataset yields `(x, y)` int64 pairs of shape (B, T): `x` the input tokens, `y` the next-token targets,
with -100 (PyTorch's `ignore_index`) where a position is not scored. Tensors are on the CPU; the training
loop moves them. Evaluation sets and probes are built once, from the dataset's seed, and cached.
"""

from __future__ import annotations

import abc
import math
import zlib
from typing import Any

import numpy as np


class _Torch:
    """torch, imported on first use: checking a dataset's parameters and reading its files
    (`ssa-tune validate`) needs numpy only; making batches needs torch."""

    def __getattr__(self, name: str):
        import torch as module

        return getattr(module, name)


torch = _Torch()

IGNORE = -100


class DataError(ValueError):
    """Bad dataset parameters or data. The message reads "dataset.FIELD: reason"."""


# ---------------------------------------------------------------------------------------------------------
# seeding


def derive_seed(seed: int, *tags: str | int) -> int:
    """A 63-bit seed for `seed` plus tags (e.g. the split), stable across runs and platforms."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for t in tags:
        words.append(zlib.crc32(t.encode()) if isinstance(t, str) else int(t) & 0xFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def torch_generator(seed: int, *tags: str | int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


def numpy_rng(seed: int, *tags: str | int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *tags))


# ---------------------------------------------------------------------------------------------------------
# accuracy


def sequence_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sequence: 1.0 when the argmax of every scored position (y != -100) equals its target, else 0.0.

    logits (B, T, V), y (B, T). A sequence with no scored position counts as correct (vacuously).
    """
    if logits.dim() != 3 or y.dim() != 2 or logits.shape[:2] != y.shape:
        raise ValueError(f"logits (B, T, V) and y (B, T) expected, got {tuple(logits.shape)} and {tuple(y.shape)}")
    scored = y != IGNORE
    hit = logits.argmax(-1) == y
    return (hit | ~scored).all(dim=1).float()


def passkey_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Passkey retrieval accuracy per sequence: every key digit after the query marker predicted right.

    The scored positions of a passkey `y` are exactly the key digits, so this is `sequence_accuracy`.
    """
    return sequence_accuracy(logits, y)


# ---------------------------------------------------------------------------------------------------------
# the interface


class Dataset(abc.ABC):
    """A seeded dataset with train / val / test splits. See the module docstring for the batch format."""

    name: str
    vocab_size: int
    seq_len: int
    optimal_loss: float | None = None

    @classmethod
    def check(cls, spec: dict[str, Any]) -> None:
        """Raise DataError when `spec` cannot make this dataset; never imports torch. By default the dataset is
        built (text kinds read and encode their files with numpy); kinds that generate data only check their
        parameters (`_read`)."""
        cls(spec, seed=0)

    def __init__(self, params: dict[str, Any], seed: int):
        self.params = dict(params)  # resolved parameters (defaults filled in), JSON-safe
        self.seed = int(seed)
        # val/test sets and probes come from eval_seed when given, so re-runs with other training seeds can
        # be scored on the very same held-out data
        es = self.params.get("eval_seed")
        self.eval_seed = self.seed if es is None else int(es)
        self._groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._batches: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._probes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @abc.abstractmethod
    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T), T <= seq_len. All randomness comes from `generator` (a CPU generator)."""

    @abc.abstractmethod
    def _eval_groups(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation sequences of a split as groups of equal length (independent of batch size)."""

    def eval_batches(self, split: str, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """'val' or 'test': a fixed list of batches, the same every call (cached; do not modify in place).

        The sequences do not depend on `batch_size`; only how they are cut into batches does.
        """
        if split not in ("val", "test"):
            raise ValueError(f"split: must be 'val' or 'test', got {split!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        key = (split, batch_size)
        if key not in self._batches:
            if split not in self._groups:
                self._groups[split] = self._eval_groups(split)
            out = []
            for x, y in self._groups[split]:
                for i in range(0, x.shape[0], batch_size):
                    out.append((x[i:i + batch_size], y[i:i + batch_size]))
            self._batches[key] = out
        return list(self._batches[key])

    def accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-sequence task accuracy (0/1 floats), or None for plain language modelling."""
        return None

    def probes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Named fixed probe batches scored with `accuracy`; {} when the dataset has none."""
        if self._probes is None:
            self._probes = self._make_probes()
        return dict(self._probes)

    def _make_probes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for logging: the kind, every resolved parameter, vocab, seq_len, seed."""
        out = {"kind": self.name, **self.params, "vocab_size": int(self.vocab_size),
               "seq_len": int(self.seq_len), "seed": self.seed}
        if self.optimal_loss is not None:
            out["optimal_loss"] = float(self.optimal_loss)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


# ---------------------------------------------------------------------------------------------------------
# parameter checking: every message names the field as dataset.FIELD


class Params:
    """Reads a spec's parameters with defaults, checking types and ranges."""

    def __init__(self, spec: dict[str, Any], accepted: set[str], kind: str):
        self.spec = spec
        unknown = sorted(k for k in spec if k != "kind" and k not in accepted)
        if unknown:
            raise DataError(f"dataset.{unknown[0]}: unknown parameter for kind {kind!r} "
                            f"(accepted: {', '.join(sorted(accepted))})")
        self.resolved: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return self.spec.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        v = self.spec.get(name)
        return default if v is None else v

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.spec.get(name, default)
        if v is None:
            self.resolved[name] = None
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DataError(f"dataset.{name}: must be an integer, got {v!r}")
        v = int(v)
        if lo is not None and v < lo:
            raise DataError(f"dataset.{name}: must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise DataError(f"dataset.{name}: must be <= {hi}, got {v}")
        self.resolved[name] = v
        return v

    def float(self, name: str, default: float, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False, hi_open: bool = False) -> float:
        v = self.spec.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise DataError(f"dataset.{name}: must be a finite number, got {v!r}")
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise DataError(f"dataset.{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise DataError(f"dataset.{name}: must be {'<' if hi_open else '<='} {hi}, got {v}")
        self.resolved[name] = v
        return v

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.spec.get(name, default)
        if v not in choices:
            raise DataError(f"dataset.{name}: must be one of {', '.join(choices)}, got {v!r}")
        self.resolved[name] = v
        return v

    def str(self, name: str, default: str | None) -> str | None:
        v = self.spec.get(name, default)
        if v is not None and not isinstance(v, str):
            if hasattr(v, "__fspath__"):
                v = str(v)
            else:
                raise DataError(f"dataset.{name}: must be a string, got {v!r}")
        self.resolved[name] = v
        return v

    def number_list(self, name: str, default: list, kind: type, lo: float, hi: float,
                    lo_open: bool = False) -> list:
        v = self.spec.get(name, default)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v:
            raise DataError(f"dataset.{name}: must be a non-empty list of numbers, got {v!r}")
        out = []
        for e in v:
            if kind is int and isinstance(e, float) and e.is_integer():
                e = int(e)
            ok = not isinstance(e, bool) and (isinstance(e, int) if kind is int else isinstance(e, (int, float)))
            if not ok or (kind is float and not math.isfinite(e)):
                raise DataError(f"dataset.{name}: every entry must be {'an integer' if kind is int else 'a number'}, "
                                f"got {e!r}")
            e = kind(e)
            if e < lo or e > hi or (lo_open and e == lo):
                raise DataError(f"dataset.{name}: every entry must be in "
                                f"{'(' if lo_open else '['}{lo}, {hi}], got {e}")
            out.append(e)
        self.resolved[name] = out
        return out
