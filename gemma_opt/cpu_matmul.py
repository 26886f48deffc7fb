"""Half-precision matmuls on a CPU whose oneDNN has no kernels for them: in float32.

oneDNN has bf16 kernels for AVX-512 and AMX, and none for AVX2, the only vector ISA of most
laptops and of older servers; there ATen's bf16 fallback is slow. A prompt's INT8 linears
already multiply in ``CPU_MATMUL_DTYPE`` (``Int8GemvLinear``); ``float32_math_`` does the same
for the plain half-precision linears and convolutions left in a model, the vision tower's
above all: one 896 x 896 image took 121.3 s in bf16 and 20.2 s this way, on a Xeon told to
use AVX2 only (``scripts/vision_tower_speed.py``). The weights stay in bf16; each is converted
when it is used, which costs far less than the slow product, the large ones into one buffer
(``DequantBuffer``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _cpu_matmul_dtypes() -> dict[torch.dtype, torch.dtype]:
    """The dtype each half dtype's matmuls are fast in on this CPU: itself where oneDNN has
    kernels for it (bf16 with AVX-512; fp16 with AMX or AVX512-FP16), float32 elsewhere.
    Without them ATen's fallback is slow: [128, 2560] x [2560, 10240] took 162 ms in bf16 and
    145 in fp16 against 58 in fp32 (an AVX-512 VM with ``ONEDNN_MAX_CPU_ISA=AVX2``; fp16
    without it too). A dict made once, so that a compiled layer reads a constant; empty
    (each dtype its own) in a torch built without oneDNN, which cannot be asked."""
    if not torch.backends.mkldnn.is_available():
        return {}
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    return {dtype: dtype if fast else torch.float32 for dtype, fast in native.items()}


CPU_MATMUL_DTYPE = _cpu_matmul_dtypes()


FRESH_PAGES_BYTES = 32 << 20  # glibc's largest mmap threshold: a new tensor this large gets fresh pages


class DequantBuffer:
    """One buffer, the size of the largest weight converted, that a model's linears convert
    their weights into for a prompt (prefill) on the CPU, instead of into a new tensor each
    call: one over ``FRESH_PAGES_BYTES`` (the 4B's gate/up and down) then gets fresh pages
    from the kernel every time, and touching them cost more than the conversion. For a
    10240 x 2560 weight, INT8 to bf16: ``qdata.to(bf16)`` 17.3 ms, ``copy_`` into an existing
    tensor 2.2 ms, the linear at 128 tokens 34.4 ms against bf16's 16.7; bf16 to float32 with
    the product at 128 tokens, with AVX2 only: 59-66 ms against 38-40 (one-off timings)."""

    def __init__(self):
        self.buffer: Tensor | None = None

    def converted(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        if self.buffer is None or self.buffer.numel() < weight.numel() or self.buffer.dtype != dtype:
            self.buffer = None  # freed before the larger one is made
            self.buffer = torch.empty(weight.numel(), dtype=dtype, device=weight.device)
        return self.buffer[:weight.numel()].view(weight.shape).copy_(weight)


def _float(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.float()


class Float32MathLinear(nn.Linear):
    """A half-precision linear whose inputs of more than one row multiply in float32, rounded
    to the input's dtype once. One row (a decoded token) stays a GEMV in the weight's dtype:
    converting the weight would cost more than reading it. A weight over ``FRESH_PAGES_BYTES``
    in float32 is converted into the model's ``dequant`` buffer (set by ``float32_math_``);
    a smaller one into a new tensor, which reuses freed memory just as fast (and the vision
    tower's, which ``compile.vision`` traces, are all smaller)."""

    dequant: DequantBuffer

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == x.shape[-1]:
            return super().forward(x)
        large = self.weight.numel() * 4 > FRESH_PAGES_BYTES
        weight = self.dequant.converted(self.weight, torch.float32) if large else self.weight.float()
        return F.linear(x.float(), weight, _float(self.bias)).to(x.dtype)


class Float32MathConv2d(nn.Conv2d):
    """A half-precision convolution computed in float32 (SigLIP's patch embedding: 8.4 s of bf16
    on ATen's slow path for one image, 28 ms in float32)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x.float(), self.weight.float(), _float(self.bias)).to(x.dtype)


FLOAT32_MATH = {nn.Linear: Float32MathLinear, nn.Conv2d: Float32MathConv2d}


def float32_math_(model: nn.Module, matmul_dtype: dict[torch.dtype, torch.dtype] = CPU_MATMUL_DTYPE) -> int:
    """Make each plain ``nn.Linear`` and ``nn.Conv2d`` on the CPU whose half-precision weight
    multiplies fast only in float32 (``matmul_dtype``) compute in float32; returns how many.

    Their class is swapped, as ``torch.nn.utils.parametrize`` does: parameters, names and the
    state dict are unchanged; the linears share one ``DequantBuffer``. Quantized weights
    (torchao's tensor subclasses) are left alone."""
    swapped, dequant = 0, DequantBuffer()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) in FLOAT32_MATH and type(weight) is nn.Parameter and weight.is_cpu
                and matmul_dtype.get(weight.dtype, weight.dtype) == torch.float32 != weight.dtype):
            module.__class__ = FLOAT32_MATH[type(module)]
            if isinstance(module, Float32MathLinear):
                module.dequant = dequant
            swapped += 1
    return swapped
