"""Weight-only quantization with torchao's ``quantize_``, through the filter map."""

from __future__ import annotations

import torch
import torchao
from torch import Tensor, nn
from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

from .config import ConfigError, QuantConfig
from .filtering import FilterMap

TORCHAO_CONFIGS = {
    "int8_weight_only": Int8WeightOnlyConfig,
    "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=128),
    "float8_weight_only": Float8WeightOnlyConfig,
}


def quantize(model: nn.Module, fmap: FilterMap, config: QuantConfig) -> None:
    """Quantize the filter map's linears in place (``mode='none'`` leaves them)."""
    if config.mode == "none":
        return
    check_supported(config.mode, next(iter(fmap.modules.values())))
    quantize_(model, TORCHAO_CONFIGS[config.mode](), filter_fn=fmap.filter_fn)


def check_supported(mode: str, example: nn.Linear) -> None:
    """Quantize and run a small copy of a real layer; torchao's own error becomes a clear one.

    torchao's support differs by device, dtype and installed kernels (int4 needs CUDA
    kernels, for instance), so asking it beats keeping a table that goes stale.
    """
    weight = example.weight
    probe = nn.Sequential(nn.Linear(256, 256, bias=False, device=weight.device, dtype=weight.dtype))
    try:
        quantize_(probe, TORCHAO_CONFIGS[mode]())
        probe(torch.ones(1, 256, device=weight.device, dtype=weight.dtype))
    except Exception as e:  # noqa: BLE001 - re-raised with the reason
        raise ConfigError(f"quantization {mode} is not supported by torchao {torchao.__version__} on "
                          f"{weight.device.type} with {weight.dtype}: {type(e).__name__}: {e}") from e


def storage_bytes(t: Tensor) -> int:
    """Bytes a tensor really holds: torchao tensor subclasses are summed over their inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if hasattr(t, "__tensor_flatten__") else (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += storage_bytes(t)
    return total


def expected_int8_bytes(model: nn.Module, fmap: FilterMap) -> int:
    """What INT8 weight-only should take, from shapes alone: 1 byte a weight plus a per-row
    fp32 scale and int8 zero point for each quantized linear; everything else as it is."""
    total = weight_bytes(model)
    for m in fmap.modules.values():
        rows, cols = m.weight.shape
        total += rows * cols + rows * (4 + 1) - m.weight.numel() * m.weight.element_size()
    return total
