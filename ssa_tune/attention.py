"""Selective Self-Attention (Zhang et al., NeurIPS 2024) as a drop-in causal self-attention module.

Every SSA scaling is a per-query-row or per-key scalar, so it is folded into q and v and the layer calls
`F.scaled_dot_product_attention`: training never materialises the T x T matrix (the authors' code does).
`reference_attention` below is the plain, materialised form of the same formulas: the tests trust it, the
benchmark compares against it, and the sampled-row statistics use the same arithmetic on a few rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SSAConfig


# --------------------------------------------------------------------------------------------- rotary


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim // 2)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, hd) by the angles of the T positions given."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ------------------------------------------------------------------------------------------ kv cache


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, already rotated and already temperature-scaled.

    It also keeps each layer's fused qkv+gate projection for the decoding session: the weights cannot change
    between the tokens of one generation, and rebuilding that matrix per token would dominate decoding."""

    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)
    fused: list[tuple | None] = field(default_factory=list)

    def layer(self, i: int) -> "_LayerCache":
        while len(self.k) <= i:
            self.k.append(None)
            self.v.append(None)
            self.fused.append(None)
        return _LayerCache(self, i)

    @property
    def length(self) -> int:
        return 0 if not self.k or self.k[0] is None else self.k[0].shape[2]


@dataclass
class _LayerCache:
    cache: KVCache
    index: int

    @property
    def length(self) -> int:
        k = self.cache.k[self.index]
        return 0 if k is None else k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.cache.k[self.index], self.cache.v[self.index]
        if pk is not None:
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
        self.cache.k[self.index], self.cache.v[self.index] = k, v
        return k, v


# ---------------------------------------------------------------------------------------- temperatures


def position_coefficient(beta: torch.Tensor, kind: str) -> torch.Tensor:
    """c >= 0 of tau_pos(n) = 1 + c * log(n), from the learned beta."""
    if kind == "log_expexp":
        return torch.exp(-torch.exp(beta))
    if kind == "log_sigmoid":
        return torch.sigmoid(beta)
    if kind == "log_linear":
        return beta.clamp_min(0.0)
    raise ValueError(f"query_position: no coefficient for {kind!r}")


class SSATemperatures(nn.Module):
    """The learned temperature parameters of one layer. Everything SSA adds lives here (the name `temps`
    is how `parameter_groups` finds them)."""

    def __init__(self, d_model: int, n_heads: int, cfg: SSAConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.n_heads = d_model, n_heads
        head_dim = d_model // n_heads
        g = n_heads if cfg.per_head else 1
        if cfg.query_position != "none":
            self.beta = nn.Parameter(torch.full((g,), cfg.beta_init))
        # Linear gates of q, v and k read x through one fused projection (one matmul instead of three).
        self.linear_gates = [n for n in ("q", "v", "k") if getattr(cfg, f"{_GATE_FIELD[n]}") == "linear"]
        if self.linear_gates:
            self.gate_proj = nn.Linear(d_model, g * len(self.linear_gates))
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.zeros_(self.gate_proj.bias)
        # Shared gates reuse the head's own projected vector: f = u_h . q_h (about d_model parameters).
        self.shared_gates = [n for n in ("q", "v", "k") if getattr(cfg, _GATE_FIELD[n]) == "shared"]
        for n in self.shared_gates:
            self.register_parameter(f"u_{n}", nn.Parameter(torch.zeros(g, head_dim)))
        # the q/k/v slots holding a shared gate, as a slice (any subset of 3 slots is an arithmetic range)
        slots = sorted(_QKV.index(n) for n in self.shared_gates)
        step = slots[1] - slots[0] if len(slots) > 1 else 1
        self._shared_slots = slice(slots[0], slots[-1] + 1, step) if slots else slice(0, 0)

    @property
    def has_token_gates(self) -> bool:
        return bool(self.linear_gates or self.shared_gates)

    def fused_projection(self, qkv: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[str, int]]]:
        """Weight and bias of `qkv` extended with rows that output every token gate's pre-tanh value f.

        A shared gate is linear in x: f = u_h . q_h = u_h . (W_h x + b_h) = (W_h^T u_h) . x + u_h . b_h, so its
        rows are W_h^T u_h (H rows, one per head, also when u is shared across heads). Linear gates are rows
        already. The gates then cost a few extra output columns of the qkv matmul instead of passes over
        q, k and v, which dominate on a memory-bound CPU. Returns (weight, bias, [(gate, width), ...]) where
        the gate columns follow the 3*d_model q, k, v columns in that order.
        """
        W, b = qkv.weight, qkv.bias
        C, H = self.d_model, self.n_heads
        hd = C // H
        rows: list[torch.Tensor] = [W]
        biases: list[torch.Tensor | None] = [b]
        layout: list[tuple[str, int]] = []
        if self.linear_gates:
            rows.append(self.gate_proj.weight)
            biases.append(self.gate_proj.bias)
            g = self.gate_proj.out_features // len(self.linear_gates)
            layout += [(n, g) for n in self.linear_gates]
        if self.shared_gates:
            # Every shared gate in one batched product over W viewed as (q|k|v, H, hd, d_model); a slot without
            # a shared gate gets u = 0 and is sliced off afterwards (slicing W itself would cost a weight-sized
            # zero-fill and copy per gate in the backward pass).
            zero = W.new_zeros(H, hd)
            U = torch.stack([getattr(self, f"u_{n}").expand(H, hd) if n in self.shared_gates else zero
                             for n in _QKV])  # (3, H, hd)
            sl = self._shared_slots
            rows.append((U.unsqueeze(2) @ W.reshape(3, H, hd, -1)).squeeze(2)[sl].reshape(-1, W.shape[1]))
            biases.append(None if b is None else (b.reshape(3, H, hd) * U).sum(-1)[sl].reshape(-1))
            layout += [(n, H) for n in _QKV[sl]]
        weight = torch.cat(rows)
        bias = None
        if any(x is not None for x in biases):
            bias = torch.cat([r.new_zeros(r.shape[0]) if x is None else x for r, x in zip(rows, biases)])
        return weight, bias, layout

    def fused_scales(self, f: torch.Tensor | None, layout: list[tuple[str, int]], offset: int, T: int,
                     n_keys: int | None, device, dtype):
        """(tau_q, tau_k, tau_v) from the gate columns f (B, T, sum of widths) of `fused_projection`."""
        gates: dict[str, torch.Tensor] = {}
        if f is not None:
            a_tanh = self.cfg.token_scale * torch.tanh(f)  # one tanh for every gate
            start = 0
            for name, width in layout:
                gates[name] = a_tanh[..., start:start + width].transpose(1, 2).unsqueeze(-1)  # (B, g, T, 1)
                start += width
        tq = self.position(offset, T, n_keys, device, dtype)
        if "q" in gates:
            tq = gates["q"] + (1.0 if tq is None else tq)
        tk = 1.0 + gates["k"] if "k" in gates else None
        tv = 1.0 + gates["v"] if "v" in gates else None
        return tq, tk, tv

    def gate_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-tanh gate values f of the linear gates, each (B, g, T)."""
        if not self.linear_gates:
            return {}
        f = self.gate_proj(x)  # (B, T, g * n_linear)
        B, T, _ = f.shape
        f = f.view(B, T, len(self.linear_gates), -1).permute(2, 0, 3, 1)  # (n_linear, B, g, T)
        return dict(zip(self.linear_gates, f.unbind(0)))

    def token_gate(self, name: str, linear: dict[str, torch.Tensor], own: torch.Tensor) -> torch.Tensor | None:
        """a * tanh(f) as (B, g, T, 1), or None when the gate is off. `own` is the head's vector (B, H, T, hd)."""
        kind = getattr(self.cfg, _GATE_FIELD[name])
        if kind == "none":
            return None
        if kind == "linear":
            f = linear[name]
        else:
            u = getattr(self, f"u_{name}")  # (g, hd)
            f = torch.einsum("bhtd,hd->bht", own, u) if u.shape[0] > 1 else own @ u[0]
        return self.cfg.token_scale * torch.tanh(f).unsqueeze(-1)

    def position(self, offset: int, T: int, n_keys: int | None, device, dtype) -> torch.Tensor | None:
        """tau_pos of the T query rows as (g, T, 1): 1 + c*log(n_i), n_i = offset + i + 1 (causal) or n_keys."""
        if self.cfg.query_position == "none":
            return None
        if n_keys is None:
            n = torch.arange(offset + 1, offset + T + 1, device=device, dtype=torch.float32)
        else:
            n = torch.full((T,), float(n_keys), device=device)
        c = position_coefficient(self.beta, self.cfg.query_position)  # (g,)
        return (1.0 + c[:, None] * n.log()[None, :]).to(dtype).unsqueeze(-1)

    def scales(self, x, q, k, v, offset: int, n_keys: int | None):
        """The inverse temperatures (tau_q, tau_k, tau_v), each broadcastable to (B, H, T, 1) or None.

        The direct form of the formulas (gates read q, k, v themselves): `reference_attention` uses it; the
        layer's fast path computes the same values through `fused_projection` / `fused_scales`."""
        B, _, T, _ = q.shape
        lin = self.gate_logits(x)
        tq = self.position(offset, T, n_keys, q.device, q.dtype)
        gq = self.token_gate("q", lin, q)
        if gq is not None:
            tq = gq + (1.0 if tq is None else tq)
        gk = self.token_gate("k", lin, k)
        gv = self.token_gate("v", lin, v)
        return tq, (None if gk is None else 1.0 + gk), (None if gv is None else 1.0 + gv)


_GATE_FIELD = {"q": "query_gate", "v": "value_gate", "k": "key_gate"}
_QKV = ("q", "k", "v")  # the order of the qkv projection's outputs


# ------------------------------------------------------------------------------------------ the layer


class SelectiveSelfAttention(nn.Module):
    """Multi-head self-attention with optional SSA temperatures; with `ssa=None` it is plain attention.

    qkv: Linear(d_model, 3*d_model), outputs split q, k, v and heads contiguous (as nanoGPT); out: Linear.
    """

    def __init__(self, d_model: int, n_heads: int, ssa: SSAConfig | None = None, bias: bool = True,
                 dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model: {d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.temps: SSATemperatures | None = None
        self.ssa: SSAConfig | None = None
        # Sampled-row statistics: off on the training hot path unless a sparsity target asks for them.
        self.collect_stats = False
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        if ssa is not None:
            self.set_ssa(ssa)

    def set_ssa(self, ssa: SSAConfig | None) -> "SelectiveSelfAttention":
        """Turn SSA on (fresh, identity-initialised gates) or off, in place, keeping the attention weights."""
        self.ssa = ssa
        if ssa is None:
            self.temps = None
        else:
            w = self.qkv.weight
            self.temps = SSATemperatures(self.d_model, self.n_heads, ssa).to(device=w.device, dtype=w.dtype)
        return self

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, ssa={self.ssa is not None}"

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, offset: int,
                n_keys: int | None, cache: "_LayerCache | None" = None):
        """q, k, v (B, H, T, hd) with rotary applied and every SSA temperature folded in; also the taus."""
        B, T, C = x.shape
        temps = self.temps
        f, layout = None, []
        if temps is not None and temps.has_token_gates:
            if cache is not None and not torch.is_grad_enabled():  # one decoding session: build it once
                fused = cache.cache.fused[cache.index]
                if fused is None:
                    fused = cache.cache.fused[cache.index] = temps.fused_projection(self.qkv)
                weight, bias, layout = fused
            else:
                weight, bias, layout = temps.fused_projection(self.qkv)
            # one split (not two nested ones): the backward then assembles the gradient with a single cat
            q, k, v, f = F.linear(x, weight, bias).split((C, C, C, weight.shape[0] - 3 * C), dim=2)
        else:
            q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        taus = (None, None, None)
        if temps is not None:
            # gates read the content vectors before rotation, so they depend on content, not position
            taus = temps.fused_scales(f, layout, offset, T, n_keys, x.device, q.dtype)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[offset:offset + T], sin[offset:offset + T]), apply_rope(k, cos[offset:offset + T], sin[offset:offset + T])
        tq, tk, tv = taus
        if tq is not None:
            q = q * tq
        if tk is not None:
            k = k * tk
        if tv is not None:
            v = v * tv
        return q, k, v, taus

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: _LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        offset = 0 if cache is None else cache.length
        if not self.causal and cache is not None:
            raise ValueError("causal: a KV cache needs causal attention")
        q, k, v, taus = self.project(x, rope, offset, None if self.causal else T, cache)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        if cache is None or offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # a block of new tokens after a prefix: SDPA's is_causal aligns top-left, so pass the mask
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        self.aux_loss = None
        if self.temps is not None and (self.collect_stats or (self.training and self.ssa.uses_sparsity)):
            self._sampled_rows(q, k, taus, offset)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.out(y)

    # ------------------------------------------------------------------ sampled rows: regulariser, stats

    def _sampled_rows(self, q, k, taus, offset: int) -> None:
        """Attention rows of a sample of queries (R x T, never T x T): the sparsity term and summaries."""
        cfg = self.ssa
        T = q.shape[2]
        n_keys = k.shape[2]
        first = 1 if self.causal and offset == 0 else 0  # row 0 sees one key: its entropy is 0/0
        if T - first <= 0:
            return
        R = min(cfg.sample_rows, T - first)
        rows = torch.randperm(T - first, device=q.device)[:R] + first
        logits = (q[:, :, rows] @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, R, n_keys)
        pos = rows + offset
        if self.causal:
            visible = torch.arange(n_keys, device=q.device)[None, :] <= pos[:, None]  # (R, n_keys)
            logits = logits.masked_fill(~visible, float("-inf"))
            n = (pos + 1).to(logits.dtype)
        else:
            n = torch.full((R,), float(n_keys), device=q.device, dtype=logits.dtype)
        p = logits.float().softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, R)
        ent_norm = ent / n.float().log()
        if cfg.uses_sparsity and self.training:
            self.aux_loss = cfg.sparsity_weight * (ent_norm - cfg.sparsity_target).pow(2).mean()
        if self.collect_stats:
            kk = min(4, n_keys)
            tq, _, tv = taus
            self.stats = {
                # H/log(n) <= 1 in exact arithmetic; rounding can put a uniform row a hair above 1
                "entropy": ent_norm.detach().clamp(0.0, 1.0).flatten(),
                "topk_mass": p.topk(kk, dim=-1).values.sum(-1).detach().flatten(),
                "tau_q": (tq.expand(q.shape[0], -1, -1, -1)[:, :, rows] if tq is not None
                          else torch.ones(1, device=q.device)).detach().float().flatten(),
                "tau_v": (tv.detach().float().flatten() if tv is not None else torch.ones(1, device=q.device)),
            }


def reference_attention(layer: SelectiveSelfAttention, x: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The same layer written the materialised way (as the authors' code): logits of row i multiplied by
    tau_q(i), values by tau_v, a full T x T softmax. The trusted reference of the tests and the benchmark."""
    B, T, C = x.shape
    H, hd = layer.n_heads, layer.head_dim
    q, k, v = layer.qkv(x).split(C, dim=2)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, H, hd).transpose(1, 2)
    v = v.view(B, T, H, hd).transpose(1, 2)
    tq = tk = tv = None
    if layer.temps is not None:
        tq, tk, tv = layer.temps.scales(x, q, k, v, 0, None if layer.causal else T)
    if rope is not None:
        q, k = apply_rope(q, rope[0][:T], rope[1][:T]), apply_rope(k, rope[0][:T], rope[1][:T])
    if tk is not None:
        k = k * tk
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, T, T)
    if tq is not None:
        logits = logits * tq
    if layer.causal:
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    att = logits.softmax(-1)
    if tv is not None:
        v = v * tv
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return layer.out(y)


def authors_position_attention(layer: SelectiveSelfAttention, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The authors' released SSA (lit-gpt based), transcribed: `logits *= 1 + exp(-exp(beta)) * log(i+1)`
    on a materialised causal T x T matrix, one beta per layer. Kept to check faithfulness and to benchmark."""
    B, T, C = x.shape
    H, hd = layer.n_heads, layer.head_dim
    q, k, v = layer.qkv(x).split(C, dim=2)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    i = torch.arange(T, device=x.device, dtype=x.dtype)
    logits = logits * (1 + torch.exp(-torch.exp(beta)) * torch.log(i + 1)).view(1, 1, T, 1)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return layer.out(y)
