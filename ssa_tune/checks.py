"""The one validator of numbers, ranges and choices: used by the configs, the job spec and the datasets.

Every check raises `ValueError("NAME: reason")` naming the field, so each caller only adds its prefix
(`error: FILE: train.lr: ...`, `dataset.seq_len: ...`). No torch, no I/O.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy integers too


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None, allow_none: bool = False,
            whole_floats: bool = False) -> int | None:
    """An integer in [lo, hi]. `whole_floats` accepts 3.0 as 3 (YAML and JSON writers produce those)."""
    if value is None and allow_none:
        return None
    if whole_floats and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise ValueError(f"{name}: must be an integer{' or null' if allow_none else ''}, got {value!r}")
    value = int(value)
    _bounds(name, value, lo, hi, False, False, "an integer ")
    return value


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, allow_none: bool = False) -> float | None:
    """A finite number in the range given; `lo_open` / `hi_open` exclude the bound itself."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: must be a number{' or null' if allow_none else ''}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    _bounds(name, value, lo, hi, lo_open, hi_open)
    return value


def _bounds(name: str, v: float, lo, hi, lo_open: bool, hi_open: bool, what: str = "") -> None:
    below = lo is not None and (v < lo or (lo_open and v == lo))
    above = hi is not None and (v > hi or (hi_open and v == hi))
    if lo is not None and hi is not None and (below or above):
        raise ValueError(f"{name}: must be {what}in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {v:g}")
    if below:
        raise ValueError(f"{name}: must be {what}{'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if above:
        raise ValueError(f"{name}: must be {what}{'<' if hi_open else '<='} {hi:g}, got {v:g}")


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    # True == 1 in Python; a choice list of numbers must not accept a boolean, nor the reverse
    if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        raise ValueError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be true or false, got {value!r}")
    return value


def string(name: str, value: Any, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: must be a non-empty string{' or null' if allow_none else ''}, got {value!r}")
    return value


def mapping(name: str, value: Any, known: Iterable[str] | None = None, allow_none: bool = True) -> dict:
    """A mapping (None -> {}); with `known`, an unknown key is an error naming it and the known ones."""
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping, got {type(value).__name__}")
    if known is not None:
        known = sorted(known)
        for k in value:
            if k not in known:
                raise ValueError(f"{name}.{k}: unknown key (expected one of: {', '.join(known)})")
    return value
