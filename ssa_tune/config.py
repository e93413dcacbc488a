"""The frozen configs: SSAConfig (every knob of Selective Self-Attention), GPTConfig (the built-in model),
HFModelConfig (a local Hugging Face checkpoint to fine-tune) and TrainConfig (one training run), plus the SSA
config file format.

No torch and no I/O beyond `save_config` / `load_config`, so a config can be built, validated, logged to
MLflow and sampled by Optuna anywhere (`ssa-tune validate` never imports torch). Choices are strings
(resolved to modules in `attention.py`), so the same value logs as a param and samples as a categorical.
Every check goes through `checks`, whose errors read "FIELD: reason".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

from . import checks

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
        checks.integer("layers.count", self.count, lo=0)
        checks.choice("layers.placement", self.placement, PLACEMENTS)

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
        checks.choice("query_position", self.query_position, POSITION_KINDS)
        for name in ("query_gate", "value_gate", "key_gate"):
            checks.choice(name, getattr(self, name), GATE_KINDS)
        init = checks.number("position_init", self.position_init, allow_none=True)
        if init is not None and self.query_position == "log_linear" and init < 0:
            raise ValueError(f"position_init: must be >= 0 for log_linear (c = beta), got {init}")
        checks.number("token_scale", self.token_scale, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        checks.boolean("per_head", self.per_head)
        object.__setattr__(self, "layers", _normalise_layers(self.layers))
        checks.number("sparsity_target", self.sparsity_target, lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                      allow_none=True)
        checks.number("sparsity_weight", self.sparsity_weight, lo=0.0)
        checks.number("temperature_lr_mult", self.temperature_lr_mult, lo=0.0, lo_open=True)
        checks.integer("sample_rows", self.sample_rows, lo=1)

    @property
    def beta_init(self) -> float:
        """The initial position parameter actually used."""
        return DEFAULT_POSITION_INIT[self.query_position] if self.position_init is None else float(self.position_init)

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


@dataclass(frozen=True)
class GPTConfig:
    """The built-in decoder (`ssa_tune.GPT`): sizes, position encoding, causal or not (`model.kind: gpt`, the
    default of a job spec's `model:` section)."""

    kind: Literal["gpt"] = "gpt"
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    position: Literal["learned", "rotary", "none"] = "learned"
    causal: bool = True

    def __post_init__(self) -> None:
        checks.choice("kind", self.kind, ("gpt",))
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            checks.integer(name, getattr(self, name), lo=1)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: {self.d_model} must be divisible by n_head={self.n_head}")
        checks.choice("position", self.position, ("learned", "rotary", "none"))
        if self.position == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError("position: rotary needs an even head size")
        checks.number("dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        checks.boolean("bias", self.bias)
        checks.boolean("causal", self.causal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        return from_dict(cls, data, "model")


# model_type (config.json) -> the transformers class `ssa_tune.hf` converts; kept here, torch-free, so that
# `ssa-tune validate` can check a checkpoint without importing transformers (tests/test_hf.py checks that the
# two lists agree)
HF_MODEL_TYPES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
HF_DTYPES = ("float32", "bfloat16", "float16")
HF_ATTENTION = ("sdpa", "eager")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_TOKENIZER_VOCAB = ("vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class HFModelConfig:
    """A local Hugging Face causal LM to fine-tune in every trial (`model: {kind: hf, path: DIR}`).

    path                 a folder written by `save_pretrained` (config.json, the weights, and usually the
                         tokenizer); its model_type must be one `ssa_tune.hf` converts (HF_MODEL_TYPES)
    dtype                the dtype the weights are loaded in (float32 on CPUs; bfloat16 halves memory on GPUs)
    attn_implementation  the attention kernel the model is loaded with; SSA keeps whichever it is
    """

    kind: Literal["hf"] = "hf"
    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        checks.choice("kind", self.kind, ("hf",))
        if hasattr(self.path, "__fspath__"):
            object.__setattr__(self, "path", str(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("path: required for kind hf (a local Hugging Face checkpoint folder)")
        checks.choice("dtype", self.dtype, HF_DTYPES)
        checks.choice("attn_implementation", self.attn_implementation, HF_ATTENTION)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HFModelConfig":
        return from_dict(cls, data, "model")


ModelConfig = Union[GPTConfig, HFModelConfig]
MODEL_KINDS = ("gpt", "hf")


def model_config(data: Any) -> ModelConfig:
    """The model config a spec's `model:` section describes: `kind: gpt` (the default) or `kind: hf`."""
    if not isinstance(data, dict):
        raise ValueError(f"model: must be a mapping, got {type(data).__name__}")
    kind = data.get("kind", "gpt")
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind: must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    return HFModelConfig.from_dict(data) if kind == "hf" else GPTConfig.from_dict(data)


@dataclass(frozen=True)
class Checkpoint:
    """What validation reads from a checkpoint's config.json (no torch, no transformers)."""

    path: str
    model_type: str
    n_layer: int
    max_positions: int | None
    vocab_size: int | None
    has_tokenizer: bool


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Check that `path` is a Hugging Face checkpoint folder `ssa_tune.hf` can fine-tune, from its files and
    config.json alone. Errors read "DIR: reason" (the caller names the field)."""
    d = Path(path)
    if not d.exists():
        raise ValueError(f"{path}: no such directory")
    if not d.is_dir():
        raise ValueError(f"{path}: not a directory (a Hugging Face checkpoint folder is expected)")
    f = d / "config.json"
    if not f.is_file():
        raise ValueError(f"{path}: no config.json there (not a Hugging Face checkpoint folder)")
    try:
        data = json.loads(f.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read config.json: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: config.json is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config.json must hold a JSON object")
    model_type = data.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(sorted(HF_MODEL_TYPES))})")
    n_layer = data.get("num_hidden_layers", data.get("n_layer"))
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"{path}: config.json has no number of layers (num_hidden_layers)")
    if not any((d / w).is_file() for w in HF_WEIGHTS):
        raise ValueError(f"{path}: no model weights there ({', '.join(HF_WEIGHTS)})")
    positions = data.get("max_position_embeddings", data.get("n_positions"))
    vocab = data.get("vocab_size")
    has_tokenizer = (d / "tokenizer.json").is_file() or (
        (d / "tokenizer_config.json").is_file() and any((d / v).is_file() for v in HF_TOKENIZER_VOCAB))
    return Checkpoint(str(path), model_type, n_layer, positions if isinstance(positions, int) else None,
                      vocab if isinstance(vocab, int) else None, has_tokenizer)


FREEZE_MODES = ("none", "base", "below")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: AdamW with warm-up + cosine, evaluation every `eval_every` steps.

    freeze  which parameters train (the same for the built-in GPT and a Hugging Face checkpoint; see
            `ssa_tune.optim.freeze`):
            none   every parameter;
            base   the SSA parameters only, the model itself stays as it was. A model without SSA has
                   nothing to train then, so a study's baseline arm cannot use it (a validation error): the
                   unchanged model is the baseline of such a study, and every trial reports its loss as
                   `val_loss_at_start`;
            below  the lowest converted layer and every layer above it, with the parameters after the last
                   layer (final norm, an untied output head); the SSA parameters too. The layers below and
                   the input embeddings (with an output head tied to them) stay frozen. The baseline arm
                   trains the very same layers: those the spec's `ssa.layers` selects, so both arms
                   fine-tune the same base parameters and SSA adds only its own.
    """

    max_steps: int = 300
    max_tokens: int | None = None  # a budget in tokens instead of steps (wins when set)
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 50
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch threads; None = leave as is
    latency_tokens: int = 16  # tokens decoded to measure inference latency at the end
    freeze: Literal["none", "base", "below"] = "none"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every"):
            checks.integer(name, getattr(self, name), lo=1)
        for name in ("warmup_steps", "seed", "latency_tokens"):
            checks.integer(name, getattr(self, name), lo=0)
        checks.integer("max_tokens", self.max_tokens, lo=1, allow_none=True)
        checks.integer("threads", self.threads, lo=1, allow_none=True)
        for name in ("lr", "grad_clip"):
            checks.number(name, getattr(self, name), lo=0.0, lo_open=True)
        checks.number("weight_decay", self.weight_decay, lo=0.0)
        checks.number("min_lr_frac", self.min_lr_frac, lo=0.0, hi=1.0)
        for name in ("beta1", "beta2"):
            checks.number(name, getattr(self, name), lo=0.0, hi=1.0, hi_open=True)
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        checks.choice("freeze", self.freeze, FREEZE_MODES)

    def steps_for(self, seq_len: int) -> int:
        """The steps a run trains for on sequences of `seq_len` tokens: max_steps, or what the token budget
        buys at batch_size x grad_accum sequences a step."""
        if self.max_tokens is None:
            return self.max_steps
        return max(1, math.ceil(self.max_tokens / (self.batch_size * self.grad_accum * seq_len)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data, "train")


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
