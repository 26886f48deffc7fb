"""``int8_gemv`` on CUDA: a Triton kernel, registered as ``gemma_opt::int8_gemv_cuda``.

On a GPU, torchao's INT8 weight-only linear is ``mm(x, w.to(bf16)) * s``; on the one
H200 measured (README, "On a GPU") the compiled 4B decode step ran at 14% of the
bandwidth roofline, slower than bf16 (47%); why was not profiled. This kernel reads each
int8 weight once, converts it in registers, accumulates in fp32 and rounds once. A
decoded token is one row, so the work is a matrix-vector product, split into many
programs of a few weight rows each so that enough loads are in flight to fill the memory
bus even for the 1024-row K/V projections. Which tiling is fastest differs by GPU and matrix shape, so
Triton times the candidates below once per shape on first use (``triton.autotune``; a few
seconds, in the warm-up generation).

``triton_op`` lets ``torch.compile`` see the Triton kernel, so inductor launches it from
its own code and CUDA graphs record it. Not yet run on a GPU: the tests check every
tiling against the exact product with Triton's CPU interpreter (``TRITON_INTERPRET=1``);
``scripts/gpu_check.sh`` runs them on the GPU and measures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# (weight rows, inputs per loop step, warps) per program: few rows and long steps give
# many programs with wide loads; more rows share each load of x.
CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_K": step}, num_warps=warps) for rows, step, warps in
           [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8),
            (2, 2048, 8), (4, 2048, 8)]]


@triton.jit
def int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], for BLOCK_N rows n of one row m of x."""
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + n.to(tl.int64)[:, None] * K  # 64-bit offsets: vocabulary x hidden size can pass 2**31
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        w = tl.load(rows + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0)
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


autotuned_kernel = triton.autotune(configs=CONFIGS, key=["N", "K"])(int8_gemv_kernel)


def launch(kernel, x: Tensor, weight: Tensor, scale: Tensor, **config) -> Tensor:
    """Check the inputs as the CPU kernel does and run ``kernel`` over every row of ``x``
    (``config``: a fixed tiling, for a kernel that is not autotuned)."""
    torch._check(weight.dim() == 2 and weight.dtype == torch.int8, lambda: "int8_gemv: weight must be a 2-D int8 tensor")
    N, K = weight.shape
    torch._check(x.shape[-1] == K, lambda: f"int8_gemv: x has {x.shape[-1]} features, weight has {K}")
    torch._check(scale.numel() == N, lambda: f"int8_gemv: one scale per weight row expected, got {scale.numel()}")
    torch._check(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
                 lambda: f"int8_gemv: x must be bfloat16, float16 or float32, got {x.dtype}")
    y = x.new_empty(*x.shape[:-1], N)
    rows = x.numel() // K
    kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), rows)](
        x.contiguous(), weight.contiguous(), scale.contiguous(), y, N, K, **config)
    return y


@triton_op("gemma_opt::int8_gemv_cuda", mutates_args=())
def int8_gemv_cuda(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """``x @ (weight * scale)ᵀ`` for int8 ``weight`` [out, in] and one scale per row, on CUDA."""
    return launch(wrap_triton(autotuned_kernel), x, weight, scale)
