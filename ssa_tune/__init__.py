"""ssa-tune: Selective Self-Attention and per-dataset tuning of its settings.

The core imports with torch alone: `SSAConfig`, `GPT`, `convert`, `load_config`. The tuning service
(Optuna, Ray Tune, MLflow) lives in modules that import those libraries lazily.
"""

from .attention import KVCache, SelectiveSelfAttention
from .config import LayerPlacement, SSAConfig, load_config, save_config
from .convert import Adapter, convert, register_adapter
from .model import GPT, GPTConfig
from .optim import parameter_groups
from .stats import attention_stats

__version__ = "0.1.0"

__all__ = [
    "Adapter", "GPT", "GPTConfig", "KVCache", "LayerPlacement", "SSAConfig", "SelectiveSelfAttention",
    "attention_stats", "convert", "load_config", "parameter_groups", "register_adapter", "save_config",
]
