"""``optimize(loaded, config)``: filter map -> pruning -> quantization -> selective compile,
run once, with a report of what each stage did. ``compress`` (the first three) and
``accelerate`` (compile and warm-up) are separate so the cold-boot cache (``cache.py``)
can save the compressed model between them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compilation import compile_decode, warm_up
from .config import PipelineConfig
from .cpu_matmul import float32_math_
from .filtering import build_filter_map
from .models import LoadedModel, ModelNotFoundError, load_model
from .pruning import PruneReport, prune
from .quantization import quantize, weight_bytes


@dataclass
class Report:
    model: str
    config: dict
    filtered: list[str]
    prune: PruneReport
    weight_bytes_before: int
    weight_bytes_after: int
    compiled: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cache: str = "off"  # the cold-boot cache: 'off', 'hit' or 'miss: <reason>' (cache.py)

    def summary(self) -> str:
        s = self.stage_seconds
        return (f"{self.model}: {len(self.filtered)} modules in the filter map; "
                f"prune {self.prune.method} -> {self.prune.overall:.1%} sparsity ({s.get('prune', 0):.1f}s); "
                f"quant {self.config['quant']['mode']}: {self.weight_bytes_before / 1e9:.3f} GB -> "
                f"{self.weight_bytes_after / 1e9:.3f} GB ({s.get('quantize', 0):.1f}s); "
                f"compiled: {', '.join(self.compiled) or 'nothing'} ({s.get('compile', 0):.1f}s with warm-up); "
                f"cold-boot cache: {self.cache}")


def optimize(loaded: LoadedModel, config: PipelineConfig) -> Report:
    """Run every stage once on ``loaded.model`` in place."""
    return accelerate(loaded, config, compress(loaded, config))


def compress(loaded: LoadedModel, config: PipelineConfig) -> Report:
    """Filter map, pruning and quantization, in place."""
    model, seconds = loaded.model, {}
    t = time.perf_counter()
    fmap = build_filter_map(model, config.filter)
    seconds["filter"] = time.perf_counter() - t
    before = weight_bytes(model)

    prune_report = prune(model, fmap, config.prune, loaded.tokenizer)
    seconds["prune"] = prune_report.seconds

    t = time.perf_counter()
    quantize(model, fmap, config.quant)
    seconds["quantize"] = time.perf_counter() - t
    return Report(loaded.name, config.model_dump(mode="json"), list(fmap.modules), prune_report, before,
                  weight_bytes(model), [], seconds)


def accelerate(loaded: LoadedModel, config: PipelineConfig, report: Report) -> Report:
    """The compiled decode step and its warm-up, and float32 math for half-precision linears
    on a CPU without fast half-precision matmuls (before compiling: the step is traced with
    them); recorded in ``report``."""
    t = time.perf_counter()
    upcast = float32_math_(loaded.model)
    report.compiled = compile_decode(loaded, config.compile)
    if report.compiled and config.compile.warmup:
        warm_up(loaded, config.compile.vision)
    if upcast:
        report.compiled.append(f"float32 math for {upcast} half-precision linears and convolutions "
                               "(this CPU has no fast kernels for them)")
    report.stage_seconds["compile"] = time.perf_counter() - t
    return report


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load(config: PipelineConfig, preprocessing: bool = True) -> LoadedModel:
    """The configured model, or the configured fallback when its folder is missing (without
    tokenizer and processor when ``preprocessing`` is false)."""
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    try:
        return load_model(config.model, device, dtype, preprocessing)
    except ModelNotFoundError:
        if not config.fallback_model or Path(config.model).exists():
            raise
        return load_model(config.fallback_model, device, dtype, preprocessing)
