"""Selective Self-Attention in Hugging Face `transformers` causal LMs: GPT-2, the Llama family, GPT-NeoX.

    import ssa_tune.hf                      # registers the adapters below with `ssa_tune.convert`
    model = ssa_tune.convert(AutoModelForCausalLM.from_pretrained(...), SSAConfig(...))
    ssa_tune.hf.save_pretrained(model, "out/")  ->  ssa_tune.hf.from_pretrained("out/")

No attention code is copied. Every SSA temperature is one number per (token, head), so it is applied where
the model *projects* q, k and v: a forward hook on the projection multiplies each head's vector by its inverse
temperature. Everything after that is the model's own code, which is why the conversion is exact:

- whatever attention kernel the model was loaded with still runs (the tests run eager and sdpa; flash and
  flex attention are handed the same already-scaled q, k, v);
- rotary embeddings rotate a vector, which commutes with scaling it (also GPT-NeoX's partial rotary), and the
  1/sqrt(d) of the kernel multiplies (tau_q q) . k just as it multiplies q . k, so the logits of row i are
  tau_q(i) times the original ones: the formulas of design §3, the same as `ssa_tune.attention`;
- values and keys are scaled before the model appends them to its KV cache: each is scaled exactly once,
  and decoding token by token equals the full forward. (From transformers 5.17 the attention function is
  handed the *cached* keys and values, so scaling there would rescale old tokens at every step.)

tau_pos needs each token's absolute position. A forward pre-hook on the attention module reads the model's
`position_ids` (transformers >= 5.17 passes them to every attention module): they already count the cached
tokens, and `generate` computes them from the attention mask, so left padding and the cache stay right.

Gates read what the built-in layer reads: a `linear` gate the projection's input x (the normalised hidden
state), a `shared` gate the head's own projected vector before rotary, f = u_h . q_h. With grouped-query
attention (fewer KV heads than query heads) the value and key temperatures are one per *KV head* and a shared
value gate reads that KV head's value vector: a value is computed and cached once for its whole group of
query heads, so one temperature per query head would mean copying every value per query head, which is
what GQA avoids. The query temperature stays per query head.

Fine-tuning a checkpoint in a tuning trial (`model: {kind: hf, path: DIR}` in a job spec): `load_checkpoint`
loads it and wraps it in `CausalLM`, which gives it the built-in GPT's training interface, so `ssa_tune.train`
runs the same loop, evaluation and decode-latency measurement (with the model's own KV cache) on both.

All new parameters live in a submodule `temps` of each converted attention module, so
`ssa_tune.optim.parameter_groups` gives them their own learning rate, and `save_pretrained` can write the
base weights and the SSA weights apart (a plain `AutoModelForCausalLM.from_pretrained` reads the folder).
The hooks hold no state but the positions of the call in progress, and `copy.deepcopy` of a converted model
re-binds them to the copy. Wrap projections (LoRA and the like) *before* converting: the hook belongs on the
module whose output the attention reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .attention import position_coefficient
from .compat import tensor_version
from .config import SSAConfig, load_config, save_config
from .convert import Adapter, convert, is_temperature, register_adapter

# The range the tests run at both ends (the attention modules get `position_ids` from 5.17 on).
TRANSFORMERS_RANGE = ">=5.17,<5.25"
SSA_CONFIG = "ssa_config.yaml"
SSA_WEIGHTS = "ssa_weights.safetensors"

_GATE_FIELD = {"q": "query_gate", "k": "key_gate", "v": "value_gate"}


# ------------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class Projection:
    """Where one projection module of an attention layer keeps the query, key and/or value heads.

    attr        the attention module's attribute: "c_attn" (GPT-2), "query_key_value" (GPT-NeoX), "q_proj"
    slots       which of q, k, v its output holds, in output order
    head_major  output laid out as (heads, slots, head_dim) as GPT-NeoX's fused projection is, instead of
                (slots, heads, head_dim) as GPT-2's `c_attn` (and any single-slot projection) is
    """

    attr: str
    slots: tuple[str, ...]
    head_major: bool = False


@dataclass(frozen=True)
class Family:
    """How one `transformers` architecture lays out its attention.

    layers(model)  -> the self-attention modules, in depth order
    heads(attn)    -> (query heads, key/value heads, head size)
    """

    layers: Callable[[nn.Module], list[nn.Module]]
    heads: Callable[[nn.Module], tuple[int, int, int]]
    projections: tuple[Projection, ...]


GPT2 = Family(
    layers=lambda m: [block.attn for block in m.base_model.h],
    heads=lambda a: (a.num_heads, a.num_heads, a.head_dim),
    projections=(Projection("c_attn", ("q", "k", "v")),),
)
LLAMA = Family(  # also Mistral and Qwen2: separate q/k/v projections, grouped-query attention
    layers=lambda m: [layer.self_attn for layer in m.base_model.layers],
    heads=lambda a: (a.config.num_attention_heads, a.config.num_key_value_heads, a.head_dim),
    projections=(Projection("q_proj", ("q",)), Projection("k_proj", ("k",)), Projection("v_proj", ("v",))),
)
GPT_NEOX = Family(  # query_key_value outputs (heads, q|k|v, head_size): the per-head interleaved layout
    layers=lambda m: [layer.attention for layer in m.base_model.layers],
    heads=lambda a: (a.config.num_attention_heads, a.config.num_attention_heads, a.head_size),
    projections=(Projection("query_key_value", ("q", "k", "v"), head_major=True),),
)

FAMILIES = {
    "GPT2LMHeadModel": GPT2,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "GPTNeoXForCausalLM": GPT_NEOX,
}


# ------------------------------------------------------------------------------------ temperatures


class _LogPositions:
    """log(position_id + 1) as (B|1, T, 1) float32, computed once per forward for all layers, which are all
    handed the same `position_ids` tensor.

    Why bother: decoding on a CPU streams the weights between two layers, so every small tensor op runs with
    cold caches (some 10 us each, measured), and the four ops of this log, per layer, cost as much as a gate.
    """

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref to position_ids, its version, log n), replaced whole

    def __call__(self, pos: torch.Tensor, T: int) -> torch.Tensor:
        entry = self._entry
        version = None if pos.is_inference() else tensor_version(pos)  # inference tensors keep no version
        if entry is not None and entry[0]() is pos and version is not None and entry[1] == version:
            return entry[2]
        # padding may carry any position id: clamping at 0 keeps its (unused) temperature finite
        log_n = pos.reshape(-1, T, 1).clamp_min(0).to(torch.float32).log1p()
        self._entry = (weakref.ref(pos), version, log_n)
        return log_n


_log_positions = _LogPositions()


class HFTemperatures(nn.Module):
    """The SSA parameters of one converted attention module, and the hooks that apply them.

    beta     (g_q,)          position coefficient c = position_coefficient(beta), tau_pos(n) = 1 + c log n
    u_{q,k,v} (g, head_dim)  shared gates: f = u_h . (head's own projected vector)
    gate_{q,k,v}  Linear(hidden, g)  linear gates: f = w_h . x + b_h
    g is the number of heads of that vector (query heads for q, KV heads for k and v), or 1 when not
    `per_head`. Every gate starts at zero, so tau = tau_pos for queries and 1 for keys and values.
    """

    def __init__(self, cfg: SSAConfig, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.cfg = cfg
        self.heads = {"q": n_heads, "k": n_kv_heads, "v": n_kv_heads}
        groups = {n: (h if cfg.per_head else 1) for n, h in self.heads.items()}
        if cfg.query_position != "none":
            self.beta = nn.Parameter(torch.full((groups["q"],), cfg.beta_init))
        for n, field in _GATE_FIELD.items():
            kind = getattr(cfg, field)
            if kind == "linear":
                gate = nn.Linear(hidden, groups[n])
                nn.init.zeros_(gate.weight)
                nn.init.zeros_(gate.bias)
                self.add_module(f"gate_{n}", gate)
            elif kind == "shared":
                self.register_parameter(f"u_{n}", nn.Parameter(torch.zeros(groups[n], head_dim)))
        self.scaled = {n for n, field in _GATE_FIELD.items() if getattr(cfg, field) != "none"}  # q, k, v: tau != 1
        if cfg.query_position != "none":
            self.scaled.add("q")
        self._position_ids: torch.Tensor | None = None  # of the attention call in progress
        self._coefficient: tuple | None = None  # (beta, its storage and version, c) while autograd is off
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    # ---------------------------------------------------------------------------------- the hooks

    def attach(self, attn: nn.Module, projections: tuple[Projection, ...]) -> None:
        """Hook this module's temperatures into `attn` (whose attribute `temps` it becomes)."""
        if self.cfg.query_position != "none":
            self._hooks.append(attn.register_forward_pre_hook(self._read_positions, with_kwargs=True))
        for proj in projections:
            if self.scaled.intersection(proj.slots):
                self._hooks.append(getattr(attn, proj.attr).register_forward_hook(partial(self._scale, proj)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _read_positions(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        # every call overwrites it, so a call without position_ids never sees the positions of an earlier one
        self._position_ids = kwargs.get("position_ids")

    def _scale(self, proj: Projection, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook of a projection: its output (B, T, width) with every q/k/v head multiplied by tau."""
        x = args[0]  # (B, T, hidden): what the projection read
        B, T, _ = out.shape
        S, h = len(proj.slots), self.heads[proj.slots[0]]  # a fused projection has equally many heads per slot
        if S == 1:
            y = out.view(B, T, h, -1)  # (B, T, h, hd)
            return (y * self.inverse_temperature(proj.slots[0], x, y).unsqueeze(-1)).view(B, T, -1)
        slot_dim = 3 if proj.head_major else 2
        y = out.view(B, T, h, S, -1) if proj.head_major else out.view(B, T, S, h, -1)  # (B, T, h|S, S|h, hd)
        slots = [y.select(slot_dim, i) for i in range(S)]  # each (B, T, h, hd)
        slots = [own * self.inverse_temperature(n, x, own).unsqueeze(-1) if n in self.scaled else own
                 for n, own in zip(proj.slots, slots)]
        return torch.stack(slots, dim=slot_dim).view(B, T, -1)

    # --------------------------------------------------------------------------------- the formulas

    def inverse_temperature(self, name: str, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """tau of slot `name` (q, k or v) for every token and head, (B|1, T, h|1), in `own`'s dtype.

        tau_q = tau_pos(n) + a tanh(f_q),  tau_k = 1 + a tanh(f_k),  tau_v = 1 + a tanh(f_v)
        x: (B, T, hidden) the projection's input; own: (B, T, h, hd) the slot's heads, before rotary.
        Written in few, out-of-place tensor ops: in decoding (T = 1) each op costs more than its arithmetic.
        """
        kind = getattr(self.cfg, _GATE_FIELD[name])
        if kind == "linear":
            f = getattr(self, f"gate_{name}")(x)  # (B, T, g)
        elif kind == "shared":
            f = (own * getattr(self, f"u_{name}")).sum(-1)  # u (g, hd) broadcasts over the h heads: (B, T, h)
        if name == "q" and self.cfg.query_position != "none":
            tau_pos = self.position(own.shape[1]).to(own.dtype)  # (B|1, T, g)
            return tau_pos if kind == "none" else torch.add(tau_pos, torch.tanh(f), alpha=self.cfg.token_scale)
        return torch.tanh(f) * self.cfg.token_scale + 1.0  # only scaled slots get here: the gate is on

    def position(self, T: int) -> torch.Tensor:
        """tau_pos = 1 + c log(n) of the T tokens of this call as (B|1, T, g), float32; n = position_id + 1."""
        pos = self._position_ids
        if pos is None:
            raise RuntimeError(
                "ssa_tune.hf: the attention module was called without position_ids; the query position "
                f"temperature needs them (transformers {TRANSFORMERS_RANGE} passes them to every attention module)")
        return _log_positions(pos, T) * self.coefficient() + 1.0

    def coefficient(self) -> torch.Tensor:
        """c (g,) in float32. Without autograd (evaluation, decoding) it is kept until beta changes."""
        if torch.is_grad_enabled():
            return position_coefficient(self.beta, self.cfg.query_position).float()
        beta = self.beta
        kept = self._coefficient
        key = (beta.data_ptr(), tensor_version(beta))  # moved, or updated in place (optimiser, load_state_dict)
        if kept is None or kept[0] is not beta or kept[1] != key:  # kept[0]: a replaced beta is another object
            kept = self._coefficient = (beta, key, position_coefficient(beta, self.cfg.query_position).float())
        return kept[2]

    def extra_repr(self) -> str:
        return f"heads={self.heads['q']}, kv_heads={self.heads['k']}, scaled={''.join(sorted(self.scaled))}"


# --------------------------------------------------------------------------------------- adapters


def _convert_layer(family: Family, model: nn.Module, i: int, cfg: SSAConfig) -> None:
    attn = family.layers(model)[i]
    old = getattr(attn, "temps", None)
    if isinstance(old, HFTemperatures):  # converting again replaces the earlier conversion
        old.detach()
    n_heads, n_kv_heads, head_dim = family.heads(attn)
    w = getattr(attn, family.projections[0].attr).weight
    temps = HFTemperatures(cfg, model.config.hidden_size, n_heads, n_kv_heads, head_dim)
    attn.temps = temps.to(device=w.device, dtype=w.dtype)
    temps.attach(attn, family.projections)


def register_hf_adapters() -> None:
    """Register the `transformers` model classes of FAMILIES with `ssa_tune.convert` (imports transformers)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"ssa_tune.hf needs transformers{TRANSFORMERS_RANGE}: pip install 'ssa-tune[hf]'") from e

    for class_name, family in FAMILIES.items():
        register_adapter(getattr(transformers, class_name),
                         Adapter(layers=family.layers, convert=partial(_convert_layer, family)))


register_hf_adapters()


# ------------------------------------------------------------------------------------ save and load


def save_pretrained(model: nn.Module, directory: str | Path, **hf_kwargs: Any) -> Path:
    """Write a converted model as a Hugging Face folder plus its SSA config and SSA weights beside it.

    The Hugging Face files hold the base weights only, so plain `AutoModelForCausalLM.from_pretrained`
    loads the unconverted model from the same folder; `from_pretrained` below restores the converted one.
    `hf_kwargs` go to `model.save_pretrained` (e.g. max_shard_size).
    """
    from safetensors.torch import save_file

    cfg = getattr(model, "ssa", None)
    if not isinstance(cfg, SSAConfig):
        raise ValueError("save_pretrained: the model is not converted (convert it with ssa_tune.convert first)")
    directory = Path(directory)
    state = model.state_dict()
    base = {k: v for k, v in state.items() if not is_temperature(k)}
    ssa = {k: v.detach().cpu().contiguous() for k, v in state.items() if is_temperature(k)}
    model.save_pretrained(directory, state_dict=base, **hf_kwargs)
    save_config(cfg, directory / SSA_CONFIG)
    save_file(ssa, str(directory / SSA_WEIGHTS), metadata={"format": "pt"})
    return directory


def from_pretrained(directory: str | Path, **hf_kwargs: Any) -> nn.Module:
    """Load a folder written by `save_pretrained`: the Hugging Face model, converted, with its SSA weights.

    `hf_kwargs` go to `AutoModelForCausalLM.from_pretrained` (dtype, attn_implementation, device_map, ...).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    for name in (SSA_CONFIG, SSA_WEIGHTS):
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name}: missing (not a folder written by ssa_tune.hf.save_pretrained)")
    cfg = load_config(directory / SSA_CONFIG)
    model = convert(AutoModelForCausalLM.from_pretrained(directory, **hf_kwargs), cfg)
    weights = load_file(str(directory / SSA_WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if is_temperature(k)]
    if missing or unexpected:
        raise ValueError(f"{directory / SSA_WEIGHTS}: does not match {SSA_CONFIG} "
                         f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    return model


# ------------------------------------------------------------------------------- fine-tuning in a trial


class CausalLM(nn.Module):
    """A `transformers` causal LM behind the built-in GPT's training interface, so that `ssa_tune.train` runs
    the same loop, evaluation and measurements on both:

        logits, loss = model(idx, targets)         # targets already shifted (the datasets' y), -100 ignored
        logits, _ = model(idx, cache=model.new_cache())   # decoding with the model's own KV cache

    `hf` is the wrapped model (convert and freeze that one); `ssa` is its SSAConfig once converted.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        config = model.config
        self.max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab_size = int(config.vocab_size)
        import inspect

        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns there)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @property
    def ssa(self) -> SSAConfig | None:
        return getattr(self.hf, "ssa", None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: Any = None):
        kwargs = {"use_cache": False} if cache is None else {self._cache_kw: cache, "use_cache": True}
        logits = self.hf(input_ids=idx, **kwargs).logits
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                                     ignore_index=-100)
        return logits, loss

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.hf.config)

    def aux_loss(self) -> None:
        """No sparsity regulariser: it needs the built-in layer's sampled attention rows."""
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(cfg) -> CausalLM:
    """The checkpoint of an `HFModelConfig` (`model: {kind: hf, path: DIR}`), freshly loaded, on the CPU.

    Not kept between trials on purpose: `from_pretrained` memory-maps a safetensors file, so loading it again
    in the same worker process costs about as much as copying a kept one would (SmolLM2-135M: 1.7 s the
    first time in a process, 0.06 s after; a deep copy 0.6-1.5 s), and keeping one would hold a second
    copy of the weights in every worker. Training writes to private pages, never to the file.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per trial in every worker's log otherwise
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_DTYPES[cfg.dtype],
                                                     attn_implementation=cfg.attn_implementation)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if type(model).__name__ not in FAMILIES:
        raise TypeError(f"model.path: {cfg.path}: {type(model).__name__} is not a model ssa_tune.hf converts "
                        f"(supported: {', '.join(sorted(FAMILIES))})")
    return CausalLM(model)
