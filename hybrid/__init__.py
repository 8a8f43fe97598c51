"""hybrid: run Kimi-K2 (DeepSeek-V3 architecture, block-fp8) with GPU attention and CPU experts on one box."""

from .config import ConfigError, ModelConfig
from .checkpoint import CheckpointError
from .engine import Engine

__all__ = ["Engine", "ModelConfig", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
