"""`convert(model, cfg)`: turn the selected attention layers of a model into SSA layers, in place.

A small adapter registry, keyed by model class, says where a family keeps its attention layers and how one
is converted, so Hugging Face GPT-2 / Llama / GPT-NeoX adapters can be added without touching the layer.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .config import SSAConfig

if TYPE_CHECKING:  # the registry itself needs no torch: the package imports it eagerly
    import torch.nn as nn


@dataclass(frozen=True)
class Adapter:
    """How to convert one model family.

    layers(model)           -> the model's attention modules, in depth order
    convert(model, i, cfg)  -> turns layer i into SSA in place, keeping every existing weight
    """

    layers: Callable[[nn.Module], list[nn.Module]]
    convert: Callable[[nn.Module, int, SSAConfig], None]


_ADAPTERS: dict[type, Adapter] = {}
# adapters registered on first use, by the module prefix of the model's class: the module named registers
# them when imported (so this registry never imports the layers above it, and `ssa_tune` alone needs no
# transformers)
_LAZY: dict[str, str] = {"transformers.": "ssa_tune.hf"}


def is_temperature(name: str) -> bool:
    """SSA's parameters all live under an attention layer's `temps` module."""
    return ".temps." in f".{name}"


def register_adapter(model_class: type, adapter: Adapter) -> None:
    _ADAPTERS[model_class] = adapter


def adapter_for(model: nn.Module) -> Adapter:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    for prefix, provider in _LAZY.items():
        if type(model).__module__.startswith(prefix) and provider not in sys.modules:
            importlib.import_module(provider)  # registers its adapters (the `hf` extra for transformers)
            return adapter_for(model)
    supported = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise TypeError(f"convert: no SSA adapter for {type(model).__qualname__} (supported: {supported})")


def convert(model: nn.Module, cfg: SSAConfig) -> nn.Module:
    """Convert the layers `cfg.layers` selects to SSA (the others are left as they are); returns the model."""
    if not isinstance(cfg, SSAConfig):
        raise TypeError(f"convert: cfg must be an SSAConfig, got {type(cfg).__qualname__}")
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    for i in cfg.resolve_layers(len(layers)):
        adapter.convert(model, i, cfg)
    model.ssa = cfg
    return model
