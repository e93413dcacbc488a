"""A small decoder-only GPT (nanoGPT-sized) built on SelectiveSelfAttention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, SelectiveSelfAttention, rope_cache
from .config import GPTConfig, SSAConfig
from .convert import Adapter, convert, register_adapter


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = SelectiveSelfAttention(cfg.d_model, cfg.n_head, None, cfg.bias, cfg.dropout, cfg.causal)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None):
        x = x + self.drop(self.attn(self.ln1(x), rope, cache))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LayerNorm decoder; tied input/output embeddings; learned or rotary positions.

    `GPT(config, ssa)` converts the layers `ssa.layers` selects; `GPT(config)` is the baseline.
    """

    def __init__(self, config: GPTConfig, ssa: SSAConfig | None = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying: fewer parameters, better small-data LMs
        if config.position == "rotary":
            cos, sin = rope_cache(config.seq_len, config.d_model // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.ssa: SSAConfig | None = None
        if ssa is not None:
            convert(self, ssa)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def attention_layers(self) -> list[SelectiveSelfAttention]:
        return [b.attn for b in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab) and, with targets (ignore_index -100), the mean cross-entropy."""
        B, T = idx.shape
        offset = 0 if cache is None else cache.length
        if offset + T > self.config.seq_len:
            raise ValueError(f"seq_len: {offset + T} tokens exceed the model's seq_len={self.config.seq_len}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(offset, offset + T, device=idx.device))
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.config.position == "rotary" else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layer(i))
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss

    def aux_loss(self) -> torch.Tensor | None:
        """The sparsity regulariser of the last training forward (None when no layer asks for one)."""
        terms = [a.aux_loss for a in self.attention_layers if a.aux_loss is not None]
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample with the KV cache: the prompt in one forward, then one token per step."""
        if idx.shape[1] + max_new_tokens > self.config.seq_len:
            raise ValueError(f"max_new_tokens: prompt + new tokens exceed seq_len={self.config.seq_len}")
        cache = KVCache()
        logits, _ = self(idx, cache=cache)
        out = [idx]
        for _ in range(max_new_tokens):
            last = logits[:, -1, :]
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    v, _ = torch.topk(last, min(top_k, last.size(-1)))
                    last = last.masked_fill(last < v[:, [-1]], float("-inf"))
                nxt = torch.multinomial(last.softmax(-1), 1, generator=generator)
            out.append(nxt)
            logits, _ = self(nxt, cache=cache)
        return torch.cat(out, dim=1)


# the built-in model's adapter lives with the model (convert.py stays a registry of adapters)
register_adapter(GPT, Adapter(layers=lambda m: m.attention_layers,
                              convert=lambda m, i, cfg: m.attention_layers[i].set_ssa(cfg)))
