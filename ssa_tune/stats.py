"""Attention statistics for the reports: entropy, top-k mass and temperatures on sampled query rows.

They run the same sampled-row path as the sparsity regulariser (R x T logits per layer, never T x T), in a
separate no-grad forward, so the training hot path never pays for them.
"""

from __future__ import annotations

import torch

from .model import GPT


def _summary(x: torch.Tensor) -> dict[str, float]:
    x = x.float()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item() if x.numel() > 1 else 0.0,
            "min": x.min().item(), "max": x.max().item()}


@torch.no_grad()
def attention_stats(model: GPT, idx: torch.Tensor, bins: int = 20) -> dict[str, dict]:
    """Per SSA layer: normalised entropy, top-4 mass, tau_q and tau_v summaries and histograms."""
    was_training = model.training
    model.eval()
    layers = [(i, a) for i, a in enumerate(model.attention_layers) if a.temps is not None]
    for _, a in layers:
        a.collect_stats = True
    try:
        model(idx)
    finally:
        for _, a in layers:
            a.collect_stats = False
        model.train(was_training)
    out: dict[str, dict] = {}
    for i, a in layers:
        if not a.stats:
            continue
        entry = {k: _summary(v) for k, v in a.stats.items()}
        for k in ("tau_q", "tau_v", "entropy"):
            v = a.stats[k].float()
            lo, hi = v.min().item(), v.max().item()
            if hi <= lo:
                hi = lo + 1e-6
            entry[k]["hist"] = torch.histc(v, bins=bins, min=lo, max=hi).tolist()
            entry[k]["hist_range"] = [lo, hi]
        out[f"layer{i}"] = entry
        a.stats = {}
    return out


def flat_stats(stats: dict[str, dict]) -> dict[str, float]:
    """Scalar metrics for trackers, e.g. `layer0.entropy_mean`, averaged into `ssa.*` over the layers."""
    flat: dict[str, float] = {}
    agg: dict[str, list[float]] = {}
    for layer, entry in stats.items():
        for k, summ in entry.items():
            for s in ("mean", "std"):
                flat[f"{layer}.{k}_{s}"] = summ[s]
                agg.setdefault(f"ssa.{k}_{s}", []).append(summ[s])
    flat.update({k: sum(v) / len(v) for k, v in agg.items()})
    return flat
