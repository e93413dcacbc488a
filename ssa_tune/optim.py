"""Parameter groups: temperature parameters get their own learning-rate multiplier and no weight decay."""

from __future__ import annotations

import torch.nn as nn


def is_temperature(name: str) -> bool:
    """SSA's parameters all live under an attention layer's `temps` module."""
    return ".temps." in f".{name}"


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.1,
                     temperature_lr_mult: float | None = None) -> list[dict]:
    """AdamW groups: matrices decayed; biases, norms and temperatures not; temperatures at lr * mult.

    `temperature_lr_mult` defaults to the model's SSAConfig value (1.0 without SSA). Each group carries
    `lr_mult` so a schedule can scale the base rate and keep the ratio.
    """
    if temperature_lr_mult is None:
        ssa = getattr(model, "ssa", None)
        temperature_lr_mult = ssa.temperature_lr_mult if ssa is not None else 1.0
    decay, no_decay, temps = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if is_temperature(name):
            temps.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "lr_mult": 1.0, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "lr_mult": 1.0, "name": "no_decay"},
        {"params": temps, "weight_decay": 0.0, "lr": lr * temperature_lr_mult, "lr_mult": temperature_lr_mult,
         "name": "temperature"},
    ]
    return [g for g in groups if g["params"]]
