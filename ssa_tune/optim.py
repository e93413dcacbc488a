"""Parameter groups (temperature parameters get their own learning-rate multiplier and no weight decay) and
`freeze` (which parameters a fine-tuning run trains)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .convert import adapter_for, is_temperature  # noqa: F401  (is_temperature: also imported from here)


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


# ------------------------------------------------------------------------------------------------ freeze


def _blocks(model: nn.Module) -> list[str]:
    """The qualified name of each layer (decoder block) of `model`, in depth order: the module of the
    `nn.ModuleList` entry that holds each attention layer its conversion adapter lists ("blocks.3" in the
    built-in GPT, "model.layers.3" in Llama, "transformer.h.3" in GPT-2, "gpt_neox.layers.3" in GPT-NeoX)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for attn in adapter_for(model).layers(model):
        parts = names[id(attn)].split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            raise TypeError(f"freeze: cannot tell which layer {names[id(attn)]!r} belongs to")
        out.append(".".join(parts[:index + 1]))
    return out


def freeze(model: nn.Module, mode: str, layers: Any = "all") -> dict[str, int]:
    """Set `requires_grad` of every parameter of `model` (the built-in GPT, or a Hugging Face model that
    `ssa_tune.convert` supports) for `TrainConfig.freeze`; returns the counts of trainable and frozen values.

    none   everything trains.
    base   only the SSA parameters (`.temps.`); a model without SSA has none: ValueError.
    below  the layers from the lowest converted one up, the parameters after the last layer (the final norm,
           an output head not tied to the input embeddings) and the SSA parameters; below that (input
           embeddings, learned positions, the lower layers, and an output head tied to the embeddings) frozen.
           `layers` (an SSAConfig layer selection) says which layers count as converted when the model has no
           SSA, the baseline arm of a study: it then trains exactly the base parameters an SSA model of that
           selection trains. A converted model uses its own `model.ssa.layers`.

    Parameters outside the layers are "below" when the module registers them before its first layer and
    "above" when after it (embeddings first, final norm and head last: the order of every supported family).
    """
    params = list(model.named_parameters())  # tied weights once, under their first name (the embedding)
    if mode == "none":
        trainable = {id(p) for _, p in params}
    elif mode == "base":
        trainable = {id(p) for n, p in params if is_temperature(n)}
        if not trainable:
            raise ValueError("freeze: base trains only the SSA parameters, and this model has none (not converted)")
    elif mode == "below":
        blocks = _blocks(model)
        ssa = getattr(model, "ssa", None)
        selected = (ssa.resolve_layers(len(blocks)) if ssa is not None
                    else _resolve_selection(layers, len(blocks)))
        lowest = min(selected, default=len(blocks))
        trainable, seen_block = set(), False
        for name, p in params:
            depth = next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), None)
            seen_block = seen_block or depth is not None
            above = depth is None and seen_block
            if is_temperature(name) or above or (depth is not None and depth >= lowest):
                trainable.add(id(p))
    else:
        raise ValueError(f"freeze: must be none, base or below, got {mode!r}")
    if not trainable:
        raise ValueError(f"freeze: {mode} leaves nothing to train in this model")
    counts = {"trainable": 0, "frozen": 0}
    for _, p in params:
        on = id(p) in trainable
        p.requires_grad_(on)
        counts["trainable" if on else "frozen"] += p.numel()
    return counts


def _resolve_selection(layers: Any, n_layer: int) -> tuple[int, ...]:
    from .config import SSAConfig

    return SSAConfig(layers=layers).resolve_layers(n_layer)
