"""One typed, validated config for the whole pipeline.

Every option can come from code, from a YAML/TOML file, or from an environment
variable named ``GEMMA_OPT_<SECTION>_<FIELD>`` (``GEMMA_OPT_PRUNE_RATIO=0.3``),
so ``cog.yaml`` can set the deployment's pipeline without code.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MIN_RATIO, MAX_RATIO = 0.01, 0.80
PRUNE_METHODS = ("none", "magnitude", "wanda", "gradual", "neurons", "layer_norm")
NEURON_METHODS = ("neurons", "layer_norm")  # prune whole MLP neurons, so `compact` can remove them
LAYER_RATIOS = ("uniform", "owl")
N_M_METHODS = ("magnitude", "wanda")  # scores compared within groups of M inputs of a row
QUANT_MODES = ("none", "int8_weight_only", "int4_weight_only", "float8_weight_only", "float8_dynamic")
SEMI_STRUCTURED_MODES = ("none", "float8_dynamic")  # torchao 0.18's 2:4 kernels: bf16, and float8 (CUTLASS, sm90)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# GEMMA_OPT_* variables read outside the pipeline's config: its file (here), where the bundled
# 270M is converted and a tokenizer folder for machines without the bundle (models.py)
OTHER_VARIABLES = ("GEMMA_OPT_CONFIG", "GEMMA_OPT_WEIGHTS_CACHE", "GEMMA_OPT_TOKENIZER")


class ConfigError(ValueError):
    """A pipeline option that cannot work; the message names the option."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FilterConfig(_Section):
    """Which modules the later stages touch (see ``gemma_opt.filtering``)."""

    include_vision: bool = Field(False, description="also prune and quantize the SigLIP vision tower")
    include: list[str] = Field(default_factory=list, description="fnmatch patterns over module names to add")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns over module names to drop")


class PruneConfig(_Section):
    method: Literal[PRUNE_METHODS] = Field("none", description="how weights are chosen to be zeroed")
    ratio: float | None = Field(None, description="fraction of weights zeroed (neurons: of MLP neurons); "
                                "N:M patterns imply 1 - N/M")
    scope: Literal["per_layer", "global"] = Field("per_layer", description="magnitude: rank weights within each layer "
                                                  "or across all of them")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N kept of every M inputs)")
    layer_ratios: Literal[LAYER_RATIOS] = Field(
        "uniform", description="'owl': layers with more activation outliers keep more weights (same mean)")
    owl_lambda: float = Field(0.04, ge=0.0, le=0.4, description="owl: layer ratios span target +- this")
    owl_threshold: float = Field(5.0, gt=1.0, description="owl: an outlier scores above this many times the layer mean")
    compact: bool = Field(False, description="neurons/layer_norm: remove the pruned MLP neurons from the weights "
                          "(narrower MLPs: less memory, faster on any hardware; outputs unchanged)")
    steps: int = Field(4, ge=1, le=64, description="gradual: number of pruning steps")
    calibration_file: Path | None = Field(None, description="calibration text; default ships with the package")
    calibration_tokens: int = Field(4096, ge=64, le=1 << 20, description="tokens of calibration text read")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value != "unstructured":
            n_m = value.split(":")
            if len(n_m) != 2 or not all(p.isdigit() for p in n_m) or not 0 < int(n_m[0]) < int(n_m[1]):
                raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M, got {value!r}")
        return value

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(kept, group) for an N:M pattern, else None."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @model_validator(mode="after")
    def _ratio(self) -> PruneConfig:
        if self.compact and self.method not in NEURON_METHODS:
            raise ValueError(f"compact removes whole MLP neurons: it needs method {' or '.join(NEURON_METHODS)}, "
                             f"not {self.method}")
        if self.method == "none":
            return self
        if self.n_m is not None:
            if self.method not in N_M_METHODS:
                raise ValueError(f"pattern {self.pattern} works with {' or '.join(N_M_METHODS)}, not {self.method}")
            if self.layer_ratios != "uniform":
                raise ValueError(f"pattern {self.pattern} fixes every layer's ratio; layer_ratios must be uniform")
            implied = 1 - self.n_m[0] / self.n_m[1]
            if self.ratio is not None and abs(self.ratio - implied) > 1e-6:
                raise ValueError(f"pattern {self.pattern} fixes the ratio at {implied:g}, got ratio={self.ratio}")
            return self
        if self.ratio is None or not MIN_RATIO <= self.ratio <= MAX_RATIO:
            raise ValueError(f"ratio must be within [{MIN_RATIO}, {MAX_RATIO}] for method {self.method}, got {self.ratio}")
        if self.method in ("wanda", "neurons", "layer_norm", "gradual") and self.scope != "per_layer":
            raise ValueError(f"{self.method} prunes each layer on its own; scope must be per_layer")
        if self.layer_ratios == "owl" and (self.method not in N_M_METHODS or self.scope != "per_layer"):
            raise ValueError(f"layer_ratios 'owl' works with per_layer {' or '.join(N_M_METHODS)}, "
                             f"not {self.scope} {self.method}")
        return self

    @property
    def choice(self) -> str:
        """This method as one of SPARSITY_CHOICES (the Cog input and the eval label)."""
        return f"owl-{self.method}" if self.layer_ratios == "owl" else self.method

    @property
    def target_ratio(self) -> float:
        if self.method == "none":
            return 0.0
        return 1 - self.n_m[0] / self.n_m[1] if self.n_m else self.ratio


# The Cog input `sparsity_method` and `eval --methods`: a method with its layer ratios.
SPARSITY_CHOICES = {**{m: {"method": m, "layer_ratios": "uniform"} for m in PRUNE_METHODS},
                    **{f"owl-{m}": {"method": m, "layer_ratios": "owl"} for m in N_M_METHODS}}


class QuantConfig(_Section):
    mode: Literal[QUANT_MODES] = Field("int8_weight_only", description="weight-only quantization of the decoder "
                                       "linears (float8_dynamic: activations too)")
    head: bool = Field(True, description="with int8_weight_only, also the tied LM head, the input embedding "
                       "reading the same int8 table (one copy); other modes leave the head in bf16")
    semi_structured: bool = Field(False, description="store 2:4-pruned linears in PyTorch's semi-structured sparse "
                                  "format and run them on its sparse kernels (CUDA, compute capability 8.0+); "
                                  "needs prune.pattern 2:4 and mode none (bf16) or float8_dynamic (sm90)")


class CompileConfig(_Section):
    mode: Literal[COMPILE_MODES] = Field("default", description="torch.compile mode of the decode step; "
                                         "reduce-overhead adds CUDA graphs")
    backend: str = Field("inductor", description="torch.compile backend")
    vision: bool = Field(False, description="also compile the vision tower's encoder layers")
    cache_len: int = Field(2048, ge=64, le=1 << 17, description="static KV cache positions for the compiled decode "
                           "step; a request's tokens past it decode eagerly")
    kv_bucket: int = Field(256, ge=16, description="the decode step reads the cache's first positions in "
                           "multiples of this, not all cache_len (on CPU; GPUs read all: one static shape)")
    warmup: bool = Field(True, description="run generations at setup so no request pays for compilation")
    int8_gemv: bool = Field(True, description="the decode step's INT8 linears run on gemma_opt's GEMV kernels "
                            "(int8_gemv.py; CPUs with AVX-512 or AVX2, CUDA GPUs with Triton) instead of torchao's path")
    fuse_projections: bool = Field(True, description="with int8_gemv, a layer's q, k and v projections as one INT8 "
                                   "matrix, and its gate and up projections as another: one kernel call for each")
    decode_attention: bool = Field(True, description="a decoded token's attention runs on gemma_opt's kernels "
                                   "(decode_attention.cpp on CPUs with AVX-512 or AVX2, decode_attention_cuda.py on CUDA "
                                   "GPUs with Triton) instead of two bmm calls a layer")


class PipelineConfig(_Section):
    model: str = Field("weights/gemma-3-4b-it", description="preset name, HF folder, .gguf file or hub id")
    fallback_model: str | None = Field(None, description="served when `model` is a missing folder")
    device: str = Field("auto", description="'auto' picks cuda when available")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="the weights' dtype before "
                                                            "quantization, and the activations'")
    cache_dir: Path | None = Field(None, description="cold-boot cache: the optimized model and compile artifacts, "
                                   "saved by the first setup and loaded by the next (cog.yaml: weights/cache)")
    filter: FilterConfig = Field(default_factory=FilterConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)

    @model_validator(mode="after")
    def _semi_structured(self) -> PipelineConfig:
        if self.quant.semi_structured:
            if self.prune.method == "none" or self.prune.pattern != "2:4":
                raise ValueError("quant.semi_structured needs 2:4 pruning: prune.method magnitude or wanda "
                                 "with prune.pattern '2:4'")
            if self.quant.mode not in SEMI_STRUCTURED_MODES:
                raise ValueError(f"quant.semi_structured works with quant.mode {' or '.join(SEMI_STRUCTURED_MODES)}: "
                                 f"torchao 0.18 has no 2:4 kernel for {self.quant.mode}")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None, **overrides) -> PipelineConfig:
        """Defaults, then a YAML/TOML file (``path`` or ``$GEMMA_OPT_CONFIG``), then env vars, then overrides."""
        env = dict(os.environ if env is None else env)
        data: dict = {}
        path = path or env.get("GEMMA_OPT_CONFIG")
        if path:
            try:
                text = Path(path).read_text()
                data = tomllib.loads(text) if str(path).endswith(".toml") else (yaml.safe_load(text) or {})
            except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
                where = e.problem_mark if isinstance(e, yaml.MarkedYAMLError) else None
                reason = f"{e.problem} (line {where.line + 1}, column {where.column + 1})" if where else e
                raise ConfigError(f"pipeline config file {path}: {reason}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"pipeline config file {path}: expected sections and options, got {data!r}")
        _merge(data, _from_env(env))
        _merge(data, overrides)
        return cls.validated(data)

    @classmethod
    def validated(cls, data: dict) -> PipelineConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError("invalid pipeline config: " + "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())) from None

    def replace(self, **sections: dict) -> PipelineConfig:
        """A copy with some options changed, e.g. ``cfg.replace(prune={"ratio": 0.3})``; validated."""
        data = self.model_dump()
        _merge(data, sections)
        return self.validated(data)


def env_names() -> dict[str, tuple[str, ...]]:
    """Every ``GEMMA_OPT_*`` variable and the option path it sets."""
    names = {}
    for field, info in PipelineConfig.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, _Section):
            for sub in section.model_fields:
                names[f"GEMMA_OPT_{field}_{sub}".upper()] = (field, sub)
        else:
            names[f"GEMMA_OPT_{field}".upper()] = (field,)
    return names


def env_options(config: PipelineConfig) -> list[tuple[str, str, str]]:
    """Every ``GEMMA_OPT_*`` variable, the value that sets ``config``'s option (read back by
    ``PipelineConfig.load``), and what the option means: ``python -m gemma_opt config --env``."""
    rows = []
    for name, path in env_names().items():
        owner, value = PipelineConfig, config
        for part in path:
            info, value = owner.model_fields[part], getattr(value, part)
            owner = info.annotation
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        meaning = "; ".join(filter(None, [info.description, choices and "one of " + ", ".join(choices)]))
        rows.append((name, _env_value(value), meaning))
    return rows


def _env_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(value) if isinstance(value, list) else str(value)


def _from_env(env: dict[str, str]) -> dict:
    names = env_names()
    for name in env:  # a misspelt option would otherwise leave its default in place, silently
        if name.startswith("GEMMA_OPT_") and name not in names and name not in OTHER_VARIABLES:
            prefix = len("GEMMA_OPT_")  # compared without it, which they all share
            close = difflib.get_close_matches(name[prefix:], [n[prefix:] for n in [*names, *OTHER_VARIABLES]], n=1)
            raise ConfigError(f"unknown variable {name}" + (f" (did you mean GEMMA_OPT_{close[0]}?)" if close else "")
                              + "; `python -m gemma_opt config --env` lists them all")
    data: dict = {}
    for name, path in names.items():
        if name in env:
            value: object = env[name]
            if path[-1] in ("include", "exclude"):
                value = [p.strip() for p in env[name].split(",") if p.strip()]
            elif value == "":
                value = None
            _merge(data, {path[0]: value} if len(path) == 1 else {path[0]: {path[1]: value}})
    return data


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
