"""Choosing among trials by the user's constraints: the Pareto front, `--where` rules and a `--pick` metric.

    rule = Rule.parse(["latency_ms_per_token <= 0.6"], pick="val_loss", directions={"val_loss": "minimize"})
    member = rule.choose(front_rows)        # the front member that satisfies every condition, best by `pick`

A row is {"id", "number", "arm", "metrics": {name: value}}: the trial's objective values and the final values
of every metric it reported (kept on the trial as `ssa_tune.final_metrics`). Pure functions: no Optuna,
Ray or MLflow here.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Sequence

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_COND = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    value: float

    def holds(self, metrics: dict[str, Any]) -> bool:
        v = metrics.get(self.metric)
        return isinstance(v, (int, float)) and math.isfinite(v) and OPS[self.op](v, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Rule:
    """Every condition must hold; among the rows that satisfy them, the best by `pick` in `direction`."""

    where: tuple[Condition, ...]
    pick: str
    direction: str  # minimize | maximize

    @classmethod
    def parse(cls, where: Sequence[str] | str | None, pick: str, direction: str) -> "Rule":
        """`where`: conditions like "latency_ms_per_token <= 0.6" (a list, or one string joined by ' and ').
        Raises ValueError("where: ...") on a condition it cannot read."""
        items: list[str] = []
        for w in ([where] if isinstance(where, str) else list(where or [])):
            items += [p for p in re.split(r"\s+and\s+|,", w) if p.strip()]
        conds = []
        for item in items:
            m = _COND.match(item)
            if not m:
                raise ValueError(f"where: cannot read {item.strip()!r} (write METRIC OP NUMBER, OP one of "
                                 f"{', '.join(OPS)}, e.g. 'latency_ms_per_token <= 0.6')")
            try:
                value = float(m.group(3))
            except ValueError:
                raise ValueError(f"where: {m.group(3)!r} is not a number in {item.strip()!r}") from None
            conds.append(Condition(m.group(1), m.group(2), value))
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"pick: direction must be minimize or maximize, got {direction!r}")
        return cls(tuple(conds), pick, direction)

    @property
    def metrics(self) -> set[str]:
        return {c.metric for c in self.where} | {self.pick}

    def satisfied(self, rows: list[dict]) -> list[dict]:
        return [r for r in rows if all(c.holds(r["metrics"]) for c in self.where)]

    def choose(self, rows: list[dict]) -> dict | None:
        """The best row by `pick` among those satisfying every condition (None when none does)."""
        ok = [r for r in self.satisfied(rows) if isinstance(r["metrics"].get(self.pick), (int, float))
              and math.isfinite(r["metrics"][self.pick])]
        if not ok:
            return None
        sign = 1.0 if self.direction == "minimize" else -1.0
        return min(ok, key=lambda r: (sign * r["metrics"][self.pick], r.get("number") or 0))

    def describe(self) -> str:
        where = " and ".join(map(str, self.where)) or "no condition"
        return f"where {where}; pick the {'lowest' if self.direction == 'minimize' else 'highest'} {self.pick}"

    def to_dict(self) -> dict:
        return {"where": [str(c) for c in self.where], "pick": self.pick, "direction": self.direction}


HIGHER_IS_BETTER = ("acc", "tokens_per_s", "ppl_gain")


def pick_direction(pick: str, objectives: dict[str, str]) -> tuple[str, str]:
    """(metric, direction) of a `--pick` value: "val_loss", or "max:val_acc" / "min:latency_ms_per_token".
    Without a prefix: an objective's own direction, else maximize for accuracies and throughput."""
    head, sep, rest = pick.partition(":")
    if sep and head in ("min", "max"):
        return rest, "minimize" if head == "min" else "maximize"
    if pick in objectives:
        return pick, objectives[pick]
    return pick, "maximize" if pick.endswith(HIGHER_IS_BETTER) else "minimize"


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """a is at least as good as b on every objective and better on one."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def pareto_front(rows: list[dict], objectives: Sequence[str], directions: Sequence[str]) -> list[dict]:
    """The rows no other row dominates on the objectives (rows missing an objective value are left out)."""
    def vec(r):
        return [r["metrics"].get(o) for o in objectives]

    valid = [r for r in rows if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vec(r))]
    return [r for r in valid if not any(dominates(vec(o), vec(r), directions) for o in valid if o is not r)]


def make_rule(spec, where, pick: str | None):
    """The rule of `--where`/`--pick` (or of a `select:` section) for this spec's study: `pick` defaults to the
    first objective and takes an objective's own direction. Raises ValueError("where: ...") on a bad condition."""
    metric, direction = pick_direction(pick or spec.objectives[0].metric,
                                       {o.metric: o.direction for o in spec.objectives})
    return Rule.parse(where, metric, direction)


def spec_rule(spec):
    """The spec's own `select:` rule, if it has one."""
    sel = getattr(spec, "select", None)
    return make_rule(spec, sel.get("where"), sel["pick"]) if sel else None
