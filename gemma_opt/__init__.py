"""Gemma 3 behind a compression pipeline: filter map -> pruning -> torchao INT8 -> compiled decode step."""

from .compilation import compile_decode
from .config import CompileConfig, ConfigError, FilterConfig, PipelineConfig, PruneConfig, QuantConfig
from .filtering import build_filter_map
from .models import LoadedModel, load_model
from .cache import load_and_optimize
from .pipeline import Report, optimize
from .pruning import GradualPruner, prune
from .quantization import quantize, weight_bytes

__all__ = [
    "CompileConfig", "ConfigError", "FilterConfig", "GradualPruner", "LoadedModel", "PipelineConfig",
    "PruneConfig", "QuantConfig", "Report", "build_filter_map", "compile_decode", "load_and_optimize",
    "load_model", "optimize", "prune", "quantize", "weight_bytes",
]
