"""``int8_gemv`` on CUDA: a Triton kernel, registered as ``gemma_opt::int8_gemv_cuda``.

On a GPU, torchao's INT8 weight-only linear is ``mm(x, w.to(bf16)) * s``; on an H200
(docs/speed.md, "On a GPU") the compiled 4B decode step ran at 14% of the bandwidth roofline with
it and at 35% with this kernel. Alone, this kernel reads 0.71-3.0 TB/s there, about what
inductor's code for torchao's linear reads alone, so that 14% came from something else in
its step (not found). This kernel reads each int8 weight once, converts it in registers,
accumulates in fp32 and rounds once. A decoded token is one row, so the work is a
matrix-vector product, split into many programs of a few weight rows each so that enough
loads are in flight to fill the memory bus even for the 1024-row K/V projections. Which
tiling is fastest differs by GPU and matrix shape (on the H200: 1 to 8 rows), so Triton
times the candidates below once per shape on first use (``triton.autotune``, in the
warm-up generation).

``triton_op`` lets ``torch.compile`` see the Triton kernel, so inductor launches it from
its own code and CUDA graphs record it. The tests check every tiling against the exact
product, on a GPU and with Triton's CPU interpreter (``TRITON_INTERPRET=1``), and compile
every tiling for Hopper and Ada here, without a GPU (tests/test_triton_kernels_compile.py);
``scripts/gpu_check.sh`` runs them on a GPU and measures the decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# (weight rows, inputs per loop step, warps) per program: few rows and long steps give
# many programs with wide loads; more rows share each load of x.
TILINGS = [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 8), (16, 256, 8),
           (2, 2048, 8), (4, 2048, 8)]
# A loop step waits for its own loads, so a program has one step's weights (2-8 KB) in
# flight at a time; on the H200 the 4B's larger matrices read at ~2.3 TB/s of the ~3.3
# probed. These tilings also run with the loop pipelined 3 deep: loads issued two steps
# ahead, cp.async into shared memory (tl.range's num_stages; the copies are checked in
# tests/test_triton_kernels_compile.py). Not yet timed on a GPU.
PIPELINED = TILINGS[:7]
CONFIGS = [triton.Config({"BLOCK_N": rows, "BLOCK_K": step, "STAGES": stages}, num_warps=warps)
           for stages, tilings in ((1, TILINGS), (3, PIPELINED)) for rows, step, warps in tilings]


def config_name(config: triton.Config) -> str:
    """E.g. ``4x1024w4`` (rows x step, warps), ``s3`` pipelined 3 deep."""
    c = config.kwargs
    return f"{c['BLOCK_N']}x{c['BLOCK_K']}w{config.num_warps}" + (f"s{c['STAGES']}" if c["STAGES"] > 1 else "")


@triton.jit
def int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr):
    """y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], for BLOCK_N rows n of one row m of x.

    int8 to fp32 by bit operations and a float subtraction, not the int-to-float conversion
    instruction, which runs at a fraction of the FMA rate (the CUDA guide's throughput table):
    w + 128 goes into the low bits of the float 2**23, then 2**23 + 128 is subtracted (exact).
    Both were candidates until session 21: in the autotuner's timings on the H200 this way
    was the fastest or within 0.2% on each matrix of the default step
    (docs/gpu_h200/int8_gemv_bench_run3.txt and run4.txt, "+bits"), and the other doubled
    the warm-up's compiles.
    """
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + n.to(tl.int64)[:, None] * K  # 64-bit offsets: vocabulary x hidden size can pass 2**31
    # the scales now, with the first weights: loaded after the loop, a program's last trip to
    # memory came after its sum (a few microseconds' kernel, from the SASS order)
    scale = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        k = start + tl.arange(0, BLOCK_K)
        w = tl.load(rows + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0)
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0)
        w = (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        acc += w * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1) * scale
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
