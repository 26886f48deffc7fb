"""Quantization with torchao's ``quantize_``, through the filter map; and 2:4 semi-structured
sparse storage (torchao's ``SemiSparseWeightConfig``, through the same ``quantize_``), alone in
bf16 or with float8, where the GPU has the kernels."""

from __future__ import annotations

import torch
import torchao
from torch import Tensor, nn
from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                  Int4WeightOnlyConfig, Int8WeightOnlyConfig, PerRow, quantize_)
from torchao.quantization.quantize_.workflows import Float8PackingFormat
from torchao.sparsity.sparse_api import SemiSparseWeightConfig

from .config import ConfigError, QuantConfig
from .filtering import FilterMap

TORCHAO_CONFIGS = {
    "int8_weight_only": Int8WeightOnlyConfig,
    # tinygemm (PyTorch's own _weight_int4pack_mm, CUDA sm80+, as in gpt-fast): torchao 0.18's
    # default int4 format needs the separate mslk package's kernels, and failed without them.
    "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    "float8_weight_only": Float8WeightOnlyConfig,
    "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
}
SEMI_STRUCTURED_CONFIGS = {  # 2:4 kernels in torch 2.13 / torchao 0.18, with the compute capability they need
    "none": (SemiSparseWeightConfig, (8, 0)),  # bf16 weights, cuSPARSELt (or CUTLASS)
    "float8_dynamic": (lambda: Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), packing_format=Float8PackingFormat.SPARSE_2D_DATA_2D_METADATA), (9, 0)),  # CUTLASS
}


def quantize(model: nn.Module, fmap: FilterMap, config: QuantConfig) -> None:
    """Quantize the filter map's linears in place (``mode='none'`` leaves them), or with
    ``semi_structured`` store their 2:4 zeros compressed for the sparse kernels."""
    example = next(iter(fmap.modules.values())).weight
    check_quantization(config, example.device, example.dtype)
    if config.semi_structured:
        quantize_(model, SEMI_STRUCTURED_CONFIGS[config.mode][0](), filter_fn=fmap.filter_fn)
        return
    if config.mode == "none":
        return
    quantize_(model, TORCHAO_CONFIGS[config.mode](), filter_fn=fmap.filter_fn)
    if config.head and config.mode == "int8_weight_only":
        quantize_head(model)


def quantize_head(model: nn.Module) -> None:
    """INT8 weight-only for the LM head, and the input embedding reads the same table.

    Gemma ties the two; quantizing the head alone would keep a bf16 copy for the
    embedding, and torchao's embedding on an Int8Tensor dequantizes the whole table on
    every call. ``SharedInt8Embedding`` gathers the rows first and dequantizes only them.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is not embed.weight:
        raise ConfigError("quant.head expects the LM head tied to the input embedding (as in Gemma 3)")
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: module is head)
    model.set_input_embeddings(SharedInt8Embedding(head.weight, getattr(embed, "embed_scale", None)))


class SharedInt8Embedding(nn.Module):
    """An input embedding over an INT8 table shared with the LM head, with Gemma's scale."""

    def __init__(self, weight: nn.Parameter, embed_scale: Tensor | None):
        super().__init__()
        self.weight = weight
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.weight[input_ids.reshape(-1)].dequantize().reshape(*input_ids.shape, -1)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)


def check_semi_structured_device(device: torch.device, capability: tuple[int, int]) -> None:
    """PyTorch's semi-structured kernels are CUDA only; say so before torchao fails obscurely."""
    if device.type != "cuda":
        raise ConfigError(f"quant.semi_structured runs 2:4 weights on PyTorch's semi-structured sparse kernels "
                          f"(cuSPARSELt/CUTLASS), which need a CUDA GPU of compute capability {capability[0]}."
                          f"{capability[1]} or newer; this pipeline runs on {device.type}. Without "
                          f"semi_structured, 2:4 pruning still runs, its zeros stored densely.")
    if torch.cuda.get_device_capability(device) < capability:
        raise ConfigError(f"quant.semi_structured with this mode needs compute capability {capability}, "
                          f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")


def check_quantization(config: QuantConfig, device: torch.device | str, dtype: torch.dtype) -> None:
    """A clear ConfigError when this device cannot run ``config``; cheap, so a caller can ask
    before slow or costly work (a variant's pruning, evicting a cached variant)."""
    device = torch.device(device)
    if config.semi_structured:
        make_config, capability = SEMI_STRUCTURED_CONFIGS[config.mode]
        check_semi_structured_device(device, capability)
        check_supported(f"{config.mode} 2:4 semi-structured", make_config, device, dtype, two_four=True)
    elif config.mode != "none":
        check_supported(config.mode, TORCHAO_CONFIGS[config.mode], device, dtype)


def check_supported(label: str, make_config, device: torch.device, dtype: torch.dtype, two_four: bool = False) -> None:
    """Convert and run a small layer like a real one; torchao's own error becomes a clear one.

    torchao's support differs by device, dtype and installed kernels (int4 needs CUDA
    kernels, for instance), so asking it beats keeping a table that goes stale.
    """
    probe = nn.Sequential(nn.Linear(256, 256, bias=False, device=device, dtype=dtype))
    if two_four:  # a 2:4 pattern: the two smaller of every four inputs zeroed
        with torch.no_grad():
            w = probe[0].weight.view(-1, 4)
            w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0)
    try:
        quantize_(probe, make_config())
        probe(torch.ones(1, 256, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - re-raised with the reason
        raise ConfigError(f"{label} is not supported by torchao {torchao.__version__} on "
                          f"{device.type} with {dtype}: {type(e).__name__}: {e}") from e


def plain_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors holding a tensor's data: torchao subclasses are their inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for n in names if getattr(t, n) is not None for p in plain_tensors(getattr(t, n))]
    return [t]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied tensors, and
    buffers that share a quantized weight's inner tensors)."""
    held = {(p.untyped_storage().data_ptr(), p.storage_offset()): p.numel() * p.element_size()
            for t in [*model.parameters(), *model.buffers()] for p in plain_tensors(t)}
    return sum(held.values())


def expected_int8_bytes(model: nn.Module, fmap: FilterMap, head: bool = True) -> int:
    """What INT8 weight-only should take, from shapes alone: 1 byte a weight plus a per-row
    fp32 scale and int8 zero point for each quantized linear (and the tied head, once);
    everything else as it is."""
    total = weight_bytes(model)
    for m in [*fmap.modules.values(), *([model.get_output_embeddings()] if head else [])]:
        rows, cols = m.weight.shape
        total += rows * cols + rows * (4 + 1) - m.weight.numel() * m.weight.element_size()
    return total
