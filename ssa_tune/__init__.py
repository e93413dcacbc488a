"""ssa-tune: Selective Self-Attention and per-dataset tuning of its settings.

The core needs torch alone: `SSAConfig`, `GPT`, `convert`, `load_config`, `parameter_groups` (and, with
the `hf` extra, `save_pretrained` / `from_pretrained` for Hugging Face models). The tuning service (Optuna,
Ray Tune, MLflow) lives in modules that import those libraries themselves. Names that need torch are imported
on first use, so the configs and the CLI's validation load without it.
"""

from .config import GPTConfig, LayerPlacement, SSAConfig, TrainConfig, load_config, save_config
from .convert import Adapter, convert, register_adapter

__version__ = "0.1.0"

_LAZY = {
    "KVCache": "attention", "SelectiveSelfAttention": "attention", "GPT": "model", "parameter_groups": "optim",
    "attention_stats": "stats", "save_pretrained": "hf", "from_pretrained": "hf",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Adapter", "GPT", "GPTConfig", "KVCache", "LayerPlacement", "SSAConfig", "SelectiveSelfAttention",
    "TrainConfig", "attention_stats", "convert", "load_config", "parameter_groups", "register_adapter",
    "save_config",
]
