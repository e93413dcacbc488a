"""SSAConfig: every knob of Selective Self-Attention, frozen and validated, plus its file format.

No torch and no I/O beyond `save_config` / `load_config`, so the config can be built, logged to MLflow and
sampled by Optuna anywhere. Choices are strings (resolved to modules in `attention.py`), so the same value
logs as a param and samples as a categorical.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

SCHEMA_VERSION = 1

POSITION_KINDS = ("none", "log_expexp", "log_sigmoid", "log_linear")
GATE_KINDS = ("none", "linear", "shared")
PLACEMENTS = ("top", "bottom", "middle", "interleave")

PositionKind = Literal["none", "log_expexp", "log_sigmoid", "log_linear"]
GateKind = Literal["none", "linear", "shared"]

# The authors' released code initialises beta to 1.5 in c = exp(-exp(beta)), i.e. c ~= 0.0113. The other
# parameterisations default to the same starting c so that switching parameterisation alone does not
# also switch the starting temperature.
_AUTHORS_C = math.exp(-math.exp(1.5))
DEFAULT_POSITION_INIT = {
    "none": 0.0,
    "log_expexp": 1.5,
    "log_sigmoid": math.log(_AUTHORS_C / (1.0 - _AUTHORS_C)),
    "log_linear": _AUTHORS_C,
}


@dataclass(frozen=True)
class LayerPlacement:
    """Convert `count` layers chosen by `placement` (the form the search samples)."""

    count: int
    placement: Literal["top", "bottom", "middle", "interleave"] = "top"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"layers.count: must be an integer >= 0, got {self.count!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"layers.placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")

    def resolve(self, n_layer: int) -> tuple[int, ...]:
        k = self.count
        if k > n_layer:
            raise ValueError(f"layers.count: {k} exceeds the model's {n_layer} layers")
        if k == 0:
            return ()
        if self.placement == "bottom":
            return tuple(range(k))
        if self.placement == "top":
            return tuple(range(n_layer - k, n_layer))
        if self.placement == "middle":
            start = (n_layer - k) // 2
            return tuple(range(start, start + k))
        # interleave: evenly spaced, always including the top layer
        step = n_layer / k
        return tuple(sorted({n_layer - 1 - int(i * step) for i in range(k)}))


LayerSpec = Union[Literal["all"], tuple[int, ...], LayerPlacement]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SSAConfig:
    """Selective Self-Attention settings (design §3).

    query_position  tau_pos(n) = 1 + c * log(n), c >= 0 learned per layer (per head when `per_head`):
                    log_expexp c = exp(-exp(beta)) (the authors' code), log_sigmoid c = sigmoid(beta),
                    log_linear c = beta (clamped at 0); none: tau_pos = 1.
    position_init   initial beta; None means the parameterisation's default (c ~= 0.0113 for every one).
    query_gate      token gate of the query temperature: none | linear (own projection from x) |
                    shared (u_h . q_h, about d_model parameters per layer).
    value_gate      same, for the value temperature tau_v = 1 + a*tanh(f_v(x)).
    key_gate        same, for an optional key temperature (an ablation; the paper uses q and v).
    token_scale     a in (0, 1): tau = base + a*tanh(f) stays positive.
    per_head        position parameter and gates per head (True) or shared across heads (False).
    layers          "all", explicit layer indices, or LayerPlacement(count, placement).
    sparsity_target s* in (0, 1) for the normalised entropy of sampled attention rows, or None.
    sparsity_weight lambda >= 0 of that regulariser.
    temperature_lr_mult  learning-rate multiplier of the temperature parameters (no weight decay).
    """

    query_position: PositionKind = "log_expexp"
    position_init: float | None = None
    query_gate: GateKind = "none"
    value_gate: GateKind = "none"
    key_gate: GateKind = "none"
    token_scale: float = 0.5
    per_head: bool = True
    layers: LayerSpec = "all"
    sparsity_target: float | None = None
    sparsity_weight: float = 0.0
    temperature_lr_mult: float = 1.0
    sample_rows: int = 32

    def __post_init__(self) -> None:
        _check_choice("query_position", self.query_position, POSITION_KINDS)
        for name in ("query_gate", "value_gate", "key_gate"):
            _check_choice(name, getattr(self, name), GATE_KINDS)
        if self.position_init is not None:
            init = _check_number("position_init", self.position_init)
            if self.query_position == "log_linear" and init < 0:
                raise ValueError(f"position_init: must be >= 0 for log_linear (c = beta), got {init}")
        a = _check_number("token_scale", self.token_scale)
        if not 0.0 < a < 1.0:
            raise ValueError(f"token_scale: must be in (0, 1), got {a}")
        if not isinstance(self.per_head, bool):
            raise ValueError(f"per_head: must be true or false, got {self.per_head!r}")
        object.__setattr__(self, "layers", _normalise_layers(self.layers))
        if self.sparsity_target is not None:
            s = _check_number("sparsity_target", self.sparsity_target)
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsity_target: must be null or in (0, 1), got {s}")
        w = _check_number("sparsity_weight", self.sparsity_weight)
        if w < 0:
            raise ValueError(f"sparsity_weight: must be >= 0, got {w}")
        m = _check_number("temperature_lr_mult", self.temperature_lr_mult)
        if m <= 0:
            raise ValueError(f"temperature_lr_mult: must be > 0, got {m}")
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 1:
            raise ValueError(f"sample_rows: must be an integer >= 1, got {self.sample_rows!r}")

    @property
    def beta_init(self) -> float:
        """The initial position parameter actually used."""
        return DEFAULT_POSITION_INIT[self.query_position] if self.position_init is None else float(self.position_init)

    @property
    def is_identity(self) -> bool:
        """True when the layer computes plain attention whatever its parameters."""
        return self.query_position == "none" and {self.query_gate, self.value_gate, self.key_gate} == {"none"}

    @property
    def uses_sparsity(self) -> bool:
        return self.sparsity_target is not None and self.sparsity_weight > 0

    def resolve_layers(self, n_layer: int) -> tuple[int, ...]:
        if self.layers == "all":
            return tuple(range(n_layer))
        if isinstance(self.layers, LayerPlacement):
            return self.layers.resolve(n_layer)
        bad = [i for i in self.layers if not -n_layer <= i < n_layer]
        if bad:
            raise ValueError(f"layers: indices {bad} are out of range for a model of {n_layer} layers")
        return tuple(sorted({i % n_layer for i in self.layers}))

    def replace(self, **changes: Any) -> "SSAConfig":
        return SSAConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.layers, LayerPlacement):
            d["layers"] = {"count": self.layers.count, "placement": self.layers.placement}
        elif isinstance(self.layers, tuple):
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SSAConfig":
        return from_dict(cls, data, "SSA")


def from_dict(cls, data: Any, what: str):
    """Build a config dataclass from a mapping; an unknown key is a ValueError naming it (and the known ones)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what.lower()}: must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown {what} field (known: {', '.join(sorted(known))})")
    return cls(**data)


def _normalise_layers(layers: Any) -> LayerSpec:
    if layers == "all":
        return "all"
    if isinstance(layers, LayerPlacement):
        return layers
    if isinstance(layers, dict):
        unknown = sorted(set(layers) - {"count", "placement"})
        if unknown:
            raise ValueError(f"layers.{unknown[0]}: unknown key (expected count, placement)")
        if "count" not in layers:
            raise ValueError("layers.count: required")
        return LayerPlacement(**layers)
    if isinstance(layers, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"layers: a list must hold layer indices (integers), got {list(layers)!r}")
        return tuple(layers)
    raise ValueError(f"layers: must be 'all', a list of layer indices or {{count, placement}}, got {layers!r}")


# ---------------------------------------------------------------------------------------------- files

# Top-level sections a config file may carry besides `ssa`: an exported best configuration also records
# what the SSAConfig was measured with, and `load_config` ignores those parts.
EXPORT_SECTIONS = frozenset({"model", "train", "dataset", "metrics", "study", "trial", "robustness", "source"})


@lru_cache(maxsize=None)
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads floats written without a dot (`1e-3`, `5E+1`) as numbers."""

    Loader.add_implicit_resolver(  # copies the inherited resolver table: yaml.SafeLoader is unchanged
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _yaml_load(text: str) -> Any:
    """yaml.safe_load, except that `1e-3` is a float as in YAML 1.2 and JSON: PyYAML follows YAML 1.1 and
    would hand it over as the string '1e-3', failing a hand-written config with a confusing message."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def _dump(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_config(cfg: SSAConfig, path: str | Path, **sections: Any) -> Path:
    """Write `cfg` (and optional export sections such as model/train/metrics) as YAML or JSON by suffix."""
    unknown = sorted(set(sections) - EXPORT_SECTIONS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a config file section")
    path = Path(path)
    data = {"schema_version": SCHEMA_VERSION, "ssa": cfg.to_dict()}
    data.update({k: v for k, v in sections.items() if v is not None})
    _dump(data, path)
    return path


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and check the envelope of a config file; errors name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = _yaml_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path}: schema_version: required integer")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version: {version} is newer than this ssa-tune reads ({SCHEMA_VERSION})")
    if version < 1:
        raise ValueError(f"{path}: schema_version: must be >= 1")
    unknown = sorted(set(data) - {"schema_version", "ssa"} - EXPORT_SECTIONS)
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown key")
    if "ssa" not in data:
        raise ValueError(f"{path}: ssa: required")
    return data


def load_config(path: str | Path) -> SSAConfig:
    """Read the SSAConfig of a config file or of an exported best configuration."""
    data = read_config_file(path)
    try:
        return SSAConfig.from_dict(data["ssa"])
    except ValueError as e:
        raise ValueError(f"{path}: ssa.{e}") from None
    except TypeError as e:
        raise ValueError(f"{path}: ssa: {e}") from None
