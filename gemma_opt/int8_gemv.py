"""The decode step's INT8 linears on our own GEMV kernels: C++ with AVX-512 or AVX2 on CPU
(``int8_gemv.cpp``), Triton on CUDA (``int8_gemv_cuda.py``).

Decoding one token multiplies one vector by every weight matrix, so a step costs the time
to read the weights. On CPU, torchao's INT8 weight-only linear reaches ATen's
``_weight_int8pack_mm`` once compiled, and that kernel read the 4B architecture's weights
at 23 GB/s (89% of a decode step, ``python -m gemma_opt profile``) on a machine where a
plain sum reads 30+. Ours reads four rows a quarter of the matrix apart at a time (four long
sequential streams, each prefetched 2 KB ahead into L2); it reads at 82-112% of the sum's rate
(``scripts/int8_gemv_bench.py``, Intel Xeon and AMD EPYC VMs). It computes in fp32 and
rounds once, where ATen's path rounds the product to bf16 before scaling it. The CUDA
kernel does the same on a GPU (see its module).

``use_int8_gemv(model)`` swaps each INT8 ``nn.Linear`` on a supported device for ``Int8GemvLinear``:
the same torchao weight (and parameter names), with a decoded token (one row) sent to the
kernel and longer inputs (prefill, images) computed as torchao computes them (on the CPU
without a new copy of the weight per call: ``DequantBuffer``). The CPU kernel is compiled
on first use with the C++ compiler inductor already needs (about 35 s, then cached by torch
in ``TORCH_EXTENSIONS_DIR``), in one extension with our CPU decode-attention kernel
(``decode_attention.cpp``, used by compilation.py); the CUDA ones (this GEMV's and
``decode_attention_cuda.py``) by Triton, which comes with CUDA builds of torch.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchao.quantization import Int8Tensor
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3MLP

from .cpu_matmul import CPU_MATMUL_DTYPE, DequantBuffer

SOURCE = Path(__file__).with_suffix(".cpp")
# Modules whose forward reads its input only through these projections (and the input's
# shape), as transformers 5.23 writes them: the input can be their fused output instead.
FUSABLE = {Gemma3Attention: ("q_proj", "k_proj", "v_proj"), Gemma3MLP: ("gate_proj", "up_proj")}
# The compiler flags of our CPU kernels' builds (simd.h), by torch's name for a CPU's capability.
CPU_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], "AVX2": ["-mavx2", "-mfma", "-mf16c"]}


@cache  # asked once per linear when swapping: the CPU capability and Triton lookups once
def supported(device: torch.device | str) -> bool:
    """Our kernels run on CPUs with AVX-512 or AVX2 and on CUDA GPUs with Triton (elsewhere torchao's path stays)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_isa() is not None
    return kind == "cuda" and importlib.util.find_spec("triton") is not None


def cpu_isa() -> str | None:
    """The ISA our CPU kernels are built for: torch's capability for this CPU, the highest
    we have a build for (``ATEN_CPU_CAPABILITY=avx2`` lowers it, as it lowers ATen's and
    inductor's kernels: how the tests run the AVX2 build on a CPU with AVX-512)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return next((isa for isa in CPU_ISA_FLAGS if capability.startswith(isa)), None)


@cache
def device_ops(device_type: str):
    """``torch.ops.gemma_opt`` with our ops for a device type built (first time) and registered:
    on CPU ``int8_gemv`` and ``decode_attention`` (one C++ extension, ``cpu_ops``), on CUDA
    ``int8_gemv_cuda`` and ``decode_attention_cuda`` (Triton, imported here)."""
    if device_type == "cuda":
        for module in (".int8_gemv_cuda", ".decode_attention_cuda"):
            importlib.import_module(module, __package__)
        return torch.ops.gemma_opt
    return cpu_ops()


def kernel(device_type: str):
    """The GEMV op for a device type: ``gemma_opt::int8_gemv`` (CPU) or ``gemma_opt::int8_gemv_cuda``."""
    ops = device_ops(device_type)
    return ops.int8_gemv_cuda if device_type == "cuda" else ops.int8_gemv


@cache
def cpu_ops():
    """Our CPU ops, built (first time) for ``cpu_isa()`` as one extension and registered:
    ``gemma_opt::int8_gemv`` and ``gemma_opt::decode_attention`` (decode_attention.cpp, used by
    compilation.py)."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the pinned `ninja` wheel puts its binary beside the package
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ['PATH']}"
    isa = cpu_isa()
    load(name=f"gemma_opt_cpu_kernels_{isa.lower()}", sources=[str(SOURCE), str(SOURCE.with_name("decode_attention.cpp"))],
         is_python_module=False, extra_cflags=["-O3", *CPU_ISA_FLAGS[isa], "-fopenmp"], extra_ldflags=["-fopenmp"])

    @torch.library.register_fake("gemma_opt::int8_gemv")
    def _(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("gemma_opt::decode_attention")
    def _(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])

    return torch.ops.gemma_opt


def int8_gemv(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """``x @ (weight * scale)ᵀ`` for int8 ``weight`` [out, in] and one scale per row."""
    return kernel(x.device.type)(x, weight, scale)


class Int8GemvLinear(nn.Module):
    """An INT8 weight-only linear whose one-row inputs run on ``int8_gemv``.

    ``weight`` stays torchao's ``Int8Tensor`` (the state dict and the tied LM head are
    unchanged); ``qdata`` and ``scale`` are its inner tensors, shared, as plain buffers for
    the compiled step. Longer inputs (prefill, images) compute what torchao's linear
    computes, ``mm(x, w.to(dtype)) * scale``; on the CPU with ``w`` converted into the
    model's ``DequantBuffer``, in ``CPU_MATMUL_DTYPE`` (float32 where the CPU has no fast
    half-precision matmul), and rounded to x's dtype once.
    """

    def __init__(self, linear: nn.Linear, dequant: DequantBuffer):
        super().__init__()
        self.gemv = kernel(linear.weight.device.type)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias, self.dequant = linear.weight, linear.bias, dequant
        self.register_buffer("qdata", linear.weight.qdata, persistent=False)
        self.register_buffer("scale", linear.weight.scale.reshape(-1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == x.shape[-1]:  # a decoded token
            y = self.gemv(x, self.qdata, self.scale)
            return y if self.bias is None else y + self.bias
        if not x.is_cpu:  # torchao's path: a GPU's caching allocator reuses the memory
            return F.linear(x, self.weight, self.bias)
        dtype = CPU_MATMUL_DTYPE.get(x.dtype, x.dtype)
        y = torch.mm(x.reshape(-1, x.shape[-1]).to(dtype), self.dequant.converted(self.qdata, dtype).t())
        y *= self.scale.to(dtype)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def side_by_side(cls, linears: list[Int8GemvLinear]) -> Int8GemvLinear:
        """One linear, without bias, whose output is the outputs of ``linears`` side by side:
        their INT8 rows and scales in one matrix."""
        weights = [linear.weight for linear in linears]
        first = weights[0]
        weight = Int8Tensor(torch.cat([w.qdata for w in weights]), torch.cat([w.scale for w in weights]),
                            list(first.block_size), first.dtype,
                            zero_point=None if first.zero_point is None else torch.cat([w.zero_point for w in weights]))
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        return cls(linear, linears[0].dequant)


def use_int8_gemv(model: nn.Module) -> int:
    """Swap every per-row INT8 weight-only ``nn.Linear`` whose device the kernel supports for
    ``Int8GemvLinear``; returns how many (a kernel is built only when there is one)."""
    linears = [name for name, module in model.named_modules() if _per_row_int8_linear(module)]
    dequant = DequantBuffer()
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Int8GemvLinear(model.get_submodule(name), dequant))
    return len(linears)


class OutputColumns(nn.Module):
    """A projection fused into its module's ``fused_proj``: its columns of the fused output."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, fused: Tensor) -> Tensor:
        return fused[..., self.start:self.stop]


def fuse_projections(model: nn.Module) -> int:
    """One INT8 matrix for the projections that read the same input, q, k and v, and gate and
    up: one GEMV call where there were three or two, and a longer read, which a small matrix
    makes at a lower rate. The module's input is replaced by their fused output (a forward
    pre-hook), and each projection by its columns of it, so transformers' forward runs as
    written. Where all of them are ``Int8GemvLinear`` without bias; returns how many modules."""
    fused = 0
    for module in list(model.modules()):  # a list: the loop replaces submodules
        names = FUSABLE.get(type(module), ())
        projections = [getattr(module, name) for name in names]
        if not projections or not all(type(p) is Int8GemvLinear and p.bias is None for p in projections):
            continue
        module.fused_proj = Int8GemvLinear.side_by_side(projections)
        bounds = list(itertools.accumulate((p.out_features for p in projections), initial=0))
        for name, start, stop in zip(names, bounds, bounds[1:]):
            setattr(module, name, OutputColumns(start, stop))
        module.register_forward_pre_hook(_input_through_fused_proj, with_kwargs=True)
        fused += 1
    return fused


def _input_through_fused_proj(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The MLP's input comes positionally, the attention's as ``hidden_states=``."""
    if args:
        return (module.fused_proj(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": module.fused_proj(kwargs["hidden_states"])}


def _per_row_int8_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and isinstance(weight, Int8Tensor) and supported(weight.device)
            and weight.act_quant_kwargs is None and weight.act_pre_scale is None
            and weight.block_size[-1] == weight.qdata.shape[-1])
