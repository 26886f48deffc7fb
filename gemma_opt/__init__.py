"""Gemma 3 behind a compression pipeline: filter map -> pruning -> torchao INT8 -> compiled decode step."""

import logging
import re
import warnings

import torch


class _ForeignImportWarnings(logging.Filter):
    """Drops what ``import torchao`` (0.18, on torch 2.13) warns about things this package never
    runs, four lines at the top of every command's output and every server's setup log: its
    MoE-training extension ``_C_mxfp8``, which its wheel builds for CPython 3.10; on a torch
    without CUDA, its sm_90a extension ``_C_cutlass_90a`` (float8 2:4 kernels; on a GPU the
    warning stays, as it may say why float8 + 2:4 fails); and torch's deprecation of how it
    registers two enums. Every other record passes."""

    def __init__(self):
        super().__init__()
        extensions = "mxfp8" if torch.version.cuda else "mxfp8|cutlass_90a"
        self.pattern = re.compile(rf"^Failed to load \S*/torchao/_C_({extensions})[.]"
                                  r"|^<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_filter = _ForeignImportWarnings()
for _logger in ("torchao", "torch.utils._pytree"):  # before the imports below import torchao
    logging.getLogger(_logger).addFilter(_filter)
# At the first compile of a model with torchao's INT8 weights (every setup), torch advises
# torchao's authors to give Int8Tensor a cache hash of its own; without one torch hashes its
# inner tensors and metadata itself, and compiled graphs are cached all the same: a cached boot
# in a fresh process compiles none (``bench --cold-boot``, its last column, and its test).
warnings.filterwarnings("ignore", r"Int8Tensor does not implement _stable_hash_for_caching", UserWarning)

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
