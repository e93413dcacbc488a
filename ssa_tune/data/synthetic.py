"""Synthetic tasks for the paper's phenomena, generated on the fly, vectorised, seeded.

- `passkey`: long-range retrieval of a key hidden in filler (the long-context probe).
- `markov`: per-sequence random graphs with very different node degrees (query selectivity).
- `noisy`: majority vote of signal tokens diluted by noise tokens (value selectivity).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import IGNORE, DataError, Dataset, Params, sequence_accuracy, torch, torch_generator


class _Generated(Dataset):
    """A task generated from its parameters: checking it reads them (`_read`), no data is made."""

    @classmethod
    def check(cls, spec: dict[str, Any]) -> None:
        cls.__new__(cls)._read(spec)

    def _read(self, spec: dict[str, Any]) -> Params:
        raise NotImplementedError


def _split_counts(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


# ---------------------------------------------------------------------------------------------------------
# passkey


class Passkey(_Generated):
    """A key of `key_len` distinct digits hidden at some depth in filler; the sequence ends with the query.

    Layout of the L + 1 tokens behind a sequence of length L (x = tokens[:-1], y = tokens[1:]):

        filler ... KEY d1 .. dk filler ... QUERY d1 .. dk

    The key block (KEY d1..dk) starts after round(depth * n_filler) filler tokens, so depth 0 puts it first
    and depth 1 right before the query. Only the k positions that must produce the key digits after QUERY
    are scored. Ids: 0-9 digits, 10 KEY, 11 QUERY, 12.. filler (never a digit). Filler is `random`
    (uniform over `filler_vocab` tokens) or `sentence` (the filler tokens in a fixed cycle, random phase).
    The digits of a key are distinct, so copying them back is unambiguous. Train batches draw one length
    in [min_len, seq_len] per batch and a depth in [0, 1] per sequence; the val/test sets cover 8 lengths
    from min_len to seq_len (longest first), random depths.

    Defaults (key_len 2, seq_len 128, random filler of 16 tokens): a 2-layer d_model-64 GPT at lr 3e-3,
    batch 16, reaches ~0.1-0.55 sequence accuracy by step 600 (chance 1/90), varying with the seed; with
    key_len 3 it stayed at 0 within 600 steps.
    """

    name = "passkey"
    KEY, QUERY, FILLER0 = 10, 11, 12

    def __init__(self, spec: dict[str, Any], seed: int):
        super().__init__(self._read(spec).resolved, seed)

    def _read(self, spec: dict[str, Any]) -> Params:
        p = Params(spec, KIND_PARAMS["passkey"], "passkey")
        self.key_len = k = p.int("key_len", 2, lo=1, hi=10)
        floor = 2 * k + 1  # no filler at all
        self.seq_len = p.int("seq_len", 128, lo=floor)
        self.min_len = p.int("min_len", max(floor, 8) if self.seq_len >= 8 else floor, lo=floor, hi=self.seq_len)
        default_lengths = sorted({max(floor, self.seq_len // 4), max(floor, self.seq_len // 2), self.seq_len})
        self.lengths = sorted(set(p.number_list("lengths", default_lengths, int, floor, self.seq_len)))
        p.resolved["lengths"] = self.lengths
        self.depths = p.number_list("depths", [0.0, 0.25, 0.5, 0.75, 1.0], float, 0.0, 1.0)
        self.filler = p.choice("filler", "random", ("random", "sentence"))
        self.filler_vocab = p.int("filler_vocab", 16, lo=1, hi=1 << 20)
        self.eval_sequences = p.int("eval_sequences", 256, lo=1)
        self.probe_sequences = p.int("probe_sequences", 32, lo=1)
        p.int("eval_seed", None, lo=0)
        self.vocab_size = self.FILLER0 + self.filler_vocab
        return p

    def make(self, batch_size: int, length: int, depth: torch.Tensor, g: torch.Generator,
             digits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `batch_size` sequences of `length`, key block at `depth` (B,) in [0, 1]."""
        B, k, n = batch_size, self.key_len, length + 1
        nf = n - (2 * k + 2)
        if nf < 0:
            raise ValueError(f"length: must be >= {2 * k + 1}, got {length}")
        if self.filler == "random":
            fill = torch.randint(self.FILLER0, self.vocab_size, (B, max(nf, 1)), generator=g)
        else:
            phase = torch.randint(0, self.filler_vocab, (B, 1), generator=g)
            fill = self.FILLER0 + (phase + torch.arange(max(nf, 1))) % self.filler_vocab
        if digits is None:
            digits = torch.rand(B, 10, generator=g).argsort(dim=1)[:, :k]
        off = (depth.to(torch.float64) * nf).round().long().clamp(0, nf).unsqueeze(1)  # (B, 1)
        # one gather from [filler | KEY digits | QUERY digits]
        src = torch.cat([fill[:, :nf], torch.full((B, 1), self.KEY), digits, torch.full((B, 1), self.QUERY), digits],
                        dim=1)
        pos = torch.arange(n).unsqueeze(0)  # (1, n)
        qstart = n - k - 1
        idx = torch.where(pos < off, pos, torch.where(pos <= off + k, nf + pos - off, pos - (k + 1)))
        idx = torch.where(pos >= qstart, pos - qstart + nf + k + 1, idx)
        tokens = src.gather(1, idx.expand(B, n))
        x = tokens[:, :-1].contiguous()
        y = torch.full_like(x, IGNORE)
        y[:, qstart:n - 1] = digits
        return x, y

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        length = int(torch.randint(self.min_len, self.seq_len + 1, (1,), generator=generator))
        depth = torch.rand(batch_size, generator=generator)
        return self.make(batch_size, length, depth, generator)

    def _eval_groups(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch_generator(self.eval_seed, "passkey", split)
        # longest first: eval_batches(...)[0] is then a full-length batch (for latency and attention stats)
        lens = sorted({int(round(v)) for v in np.linspace(self.min_len, self.seq_len, 8)}, reverse=True)
        groups = []
        for L, count in zip(lens, _split_counts(self.eval_sequences, len(lens))):
            if count:
                groups.append(self.make(count, L, torch.rand(count, generator=g), g))
        return groups

    def _make_probes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        g = torch_generator(self.eval_seed, "passkey", "probes")
        out = {}
        for L in self.lengths:
            for d in self.depths:
                depth = torch.full((self.probe_sequences,), float(d))
                out[f"len{L}_depth{d:.2f}"] = self.make(self.probe_sequences, L, depth, g)
        return out

    def accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sequence_accuracy(logits, y)


# ---------------------------------------------------------------------------------------------------------
# markov / graph transitions


class Markov(_Generated):
    """Each sequence has its own random directed graph, listed in context, then queries answered from it.

    Every node gets an out-degree drawn uniformly from `degrees` (very different degrees: 1, 2, 4, ...) and
    its out-neighbours uniformly among the other nodes. The edges are listed once each, in random order,
    then QUERY, then query pairs `>q a`: q a uniform node, a a uniform out-neighbour of q in this
    sequence's graph. Scored: the answers (the position holding >q predicts a). The target is uniform over
    q's out-neighbours, so the true entropy is log(degree(q)), reachable only by a model that looks up this
    sequence's edges in context (a fixed global graph would need no attention at all). `optimal_loss` is
    the mean log degree over the scored positions of the val set.

    `edge_format` says how an edge u -> v is written:
      - `token` (default): one token per edge, `<u,v>`. The query >q must attend to exactly the deg(q) edge
        tokens leaving q, uniformly, and to nothing else: sharp for degree 1, flat for degree 4 - the
        query-selectivity setting, learnable by one attention layer.
      - `pair`: two tokens `>u v`. Looking edges up then needs an induction circuit (previous-token head
        + copy), which a 2-layer d_model-64 model forms only late (n_nodes 8: after ~1,500 steps at lr 3e-3,
        batch 16; before that the loss stays near log(n_nodes)).

    Defaults (n_nodes 6, degrees 1/2/4, token, seq_len 128): a 2-layer d_model-64 GPT at lr 3e-3, batch 16,
    goes from log(6) ~ 1.8 to within ~0.02 of the entropy by step 400-500, with a sharp drop around step 300.
    n_nodes 8 is much harder (still ~1.2 nats above the entropy at step 600).

        token:  <u1,v1> <u2,v2> ... <uE,vE> QUERY >q1 a1 >q2 a2 ...   (to seq_len + 1 tokens)
        pair:   >u1 v1 >u2 v2 ... >uE vE QUERY >q1 a1 >q2 a2 ...

    Ids: target nodes 0..n-1, source nodes (>u) n..2n-1, QUERY 2n, edge tokens <u,v> 2n+1+u*n+v.
    """

    name = "markov"

    def __init__(self, spec: dict[str, Any], seed: int):
        super().__init__(self._read(spec).resolved, seed)
        self._deg_choices = torch.tensor(self.degrees)
        self._groups["val"] = self._eval_groups("val")  # sets _val_logdeg
        self.optimal_loss = self._val_logdeg

    def _read(self, spec: dict[str, Any]) -> Params:
        p = Params(spec, KIND_PARAMS["markov"], "markov")
        self.n_nodes = n = p.int("n_nodes", 6, lo=2, hi=1024)
        self.degrees = sorted(set(p.number_list("degrees", [1, 2, 4], int, 1, n - 1)))
        p.resolved["degrees"] = self.degrees
        self.edge_format = p.choice("edge_format", "token", ("token", "pair"))
        self.edge_width = 1 if self.edge_format == "token" else 2
        need = self.edge_width * n * max(self.degrees) + 2  # the longest edge list, QUERY, a query and answer
        self.seq_len = p.int("seq_len", max(128, need), lo=1)
        if self.seq_len < need:
            raise DataError(f"dataset.seq_len: must be >= {need} for n_nodes={n}, max degree "
                            f"{max(self.degrees)} and edge_format {self.edge_format} (the edge list, the "
                            f"query marker and a query), got {self.seq_len}")
        self.eval_sequences = p.int("eval_sequences", 256, lo=1)
        p.int("eval_seed", None, lo=0)
        self.SOURCE0, self.QUERY, self.EDGE0 = n, 2 * n, 2 * n + 1
        self.vocab_size = 2 * n + 1 + (n * n if self.edge_format == "token" else 0)
        return p

    def make(self, batch_size: int, g: torch.Generator):
        """x, y (B, seq_len) and the degree table deg (B, n_nodes) of each sequence's graph."""
        B, n, N, w = batch_size, self.n_nodes, self.seq_len + 1, self.edge_width
        deg = self._deg_choices[torch.randint(len(self.degrees), (B, n), generator=g)]
        scores = torch.rand(B, n, n, generator=g)
        scores.diagonal(dim1=1, dim2=2).fill_(2.0)  # never a self-loop: self sorts last
        nbr = scores.argsort(dim=2)  # (B, n, n): a random order of the other nodes, per node
        valid = torch.arange(n).view(1, 1, n) < deg.unsqueeze(2)  # the first deg[u] of them are u's neighbours
        order = torch.rand(B, n * n, generator=g).masked_fill(~valid.view(B, -1), 2.0).argsort(dim=1)
        src = torch.arange(n).repeat_interleave(n).unsqueeze(0).expand(B, -1).gather(1, order)
        dst = nbr.reshape(B, n * n).gather(1, order)
        if w == 1:
            edges = self.EDGE0 + src * n + dst
        else:
            edges = torch.stack([src + self.SOURCE0, dst], dim=2).reshape(B, 2 * n * n)
        EL = (w * deg.sum(1)).unsqueeze(1)  # (B, 1): tokens in the edge list; QUERY sits there
        Q = (N - int(EL.min())) // 2  # the most query pairs any row needs
        q = torch.randint(n, (B, Q), generator=g)
        j = (torch.rand(B, Q, generator=g) * deg.gather(1, q)).long().clamp(max=n - 1)
        a = nbr.reshape(B, n * n).gather(1, q * n + j)
        queries = torch.stack([q + self.SOURCE0, a], dim=2).reshape(B, 2 * Q)
        pos = torch.arange(N).unsqueeze(0)
        # one gather from [edge list | QUERY | query pairs]
        width = edges.shape[1]
        srcs = torch.cat([edges, torch.full((B, 1), self.QUERY), queries], dim=1)
        idx = torch.where(pos < EL, pos, torch.where(pos == EL, width, width + pos - EL))
        tokens = srcs.gather(1, idx)
        x = tokens[:, :-1].contiguous()
        y = torch.full_like(x, IGNORE)
        p = pos[:, :-1]
        is_q = (p > EL) & ((p - EL - 1) % 2 == 0)  # x holds a query node: its next token is the answer
        y[is_q] = tokens[:, 1:][is_q]
        return x, y, deg

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.make(batch_size, generator)
        return x, y

    def _eval_groups(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y, deg = self.make(self.eval_sequences, torch_generator(self.eval_seed, "markov", split))
        if split == "val":
            scored = y != IGNORE
            logdeg = deg.double().log().gather(1, (x - self.SOURCE0).clamp(0, self.n_nodes - 1))
            self._val_logdeg = float(logdeg[scored].mean())
        return [(x, y)]


# ---------------------------------------------------------------------------------------------------------
# noisy / dilution


class Noisy(_Generated):
    """Signal tokens diluted by noise tokens; at the query marker, predict the majority signal token.

        c1 c2 ... c_{seq_len-1} QUERY  ->  label

    Each sequence draws a noise level from `noise_levels`: that fraction of its content positions hold noise
    tokens (their own vocabulary, uniform), the rest signal tokens (n_signal = round((1 - level) * content),
    at least 1). The label is a uniform signal class holding a strict majority of the signal tokens
    (n_signal // 2 + 1 of them), the other signal tokens are uniform over the other classes; positions are
    shuffled. With n_signal = 1 (level 1.0) this is the paper's single-salient-token dilution setting. Only
    the last position is scored. Ids: signal 0..signal_vocab-1, noise next, QUERY last.

    Defaults (seq_len 128, levels 0.9 / 0.95 / 1.0, i.e. 13, 6 or 1 signal tokens among 127): a 2-layer
    d_model-64 GPT at lr 3e-3, batch 16, goes from chance (0.25) to ~0.7-0.9 accuracy by step 300 and ~0.99
    by step 600. Lower levels (0.5, 0.75) are solved within ~200 steps.
    """

    name = "noisy"

    def __init__(self, spec: dict[str, Any], seed: int):
        p = self._read(spec)
        self._levels = torch.tensor(self.noise_levels, dtype=torch.float64)
        super().__init__(p.resolved, seed)

    def _read(self, spec: dict[str, Any]) -> Params:
        p = Params(spec, KIND_PARAMS["noisy"], "noisy")
        self.seq_len = p.int("seq_len", 128, lo=2)
        self.signal_vocab = p.int("signal_vocab", 4, lo=2, hi=1 << 20)
        self.noise_vocab = p.int("noise_vocab", 16, lo=1, hi=1 << 20)
        self.noise_levels = p.number_list("noise_levels", [0.9, 0.95, 1.0], float, 0.0, 1.0)
        self.eval_sequences = p.int("eval_sequences", 256, lo=1)
        p.int("eval_seed", None, lo=0)
        self.QUERY = self.signal_vocab + self.noise_vocab
        self.vocab_size = self.QUERY + 1
        return p

    def make(self, batch_size: int, g: torch.Generator,
             level: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, S = batch_size, self.seq_len - 1, self.signal_vocab
        if level is None:
            level = self._levels[torch.randint(len(self.noise_levels), (B,), generator=g)]
        n_sig = ((1.0 - level) * C).round().long().clamp(1, C).unsqueeze(1)  # (B, 1)
        n_lab = n_sig // 2 + 1
        label = torch.randint(S, (B, 1), generator=g)
        others = (label + 1 + torch.randint(S - 1, (B, C), generator=g)) % S
        noise = torch.randint(S, S + self.noise_vocab, (B, C), generator=g)
        rank = torch.rand(B, C, generator=g).argsort(dim=1).argsort(dim=1)  # a random rank per position
        content = torch.where(rank < n_lab, label, torch.where(rank < n_sig, others, noise))
        x = torch.cat([content, torch.full((B, 1), self.QUERY)], dim=1)
        y = torch.full_like(x, IGNORE)
        y[:, -1] = label[:, 0]
        return x, y

    def train_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make(batch_size, generator)

    def _eval_groups(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch_generator(self.eval_seed, "noisy", split)
        # every noise level equally often, so val accuracy does not swing with the draw of levels
        counts = _split_counts(self.eval_sequences, len(self.noise_levels))
        level = torch.cat([torch.full((c,), lv, dtype=torch.float64) for c, lv in zip(counts, self.noise_levels)])
        level = level[torch.randperm(len(level), generator=g)]
        return [self.make(self.eval_sequences, g, level)]

    def accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sequence_accuracy(logits, y)


_COMMON = {"seq_len", "eval_sequences", "eval_seed"}
KIND_PARAMS: dict[str, set[str]] = {
    "passkey": _COMMON | {"key_len", "min_len", "lengths", "depths", "filler", "filler_vocab", "probe_sequences"},
    "markov": _COMMON | {"n_nodes", "degrees", "edge_format"},
    "noisy": _COMMON | {"signal_vocab", "noise_vocab", "noise_levels"},
}
