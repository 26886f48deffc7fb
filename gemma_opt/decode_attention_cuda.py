"""``decode_attention`` on CUDA: Triton kernels, registered as ``gemma_opt::decode_attention_cuda``.

A decoded token's attention over the static KV cache. On a GPU the compiled step keeps one
static shape (CUDA graphs), so every layer's attention covers the whole cache, 2048
positions by default, with the mask blocking what is not (yet) there; as matmul-softmax
attention that is two ``bmm`` calls and a softmax kernel a layer, reading every position's
K and V whatever the mask says. Here, as in the CPU kernel (decode_attention.cpp), it is
flash-decoding: the positions are cut into chunks, one program per (batch, KV head, chunk)
scores the group's query heads against its chunk and weighs the chunk's V rows, in fp32,
and a second kernel combines the chunks. A program loads no K or V row that the mask
blocks (masked loads read nothing), so a step reads the positions in use, not the cache:
two kernels a layer, one static shape. The query heads of a group go through ``tl.dot`` as
one block padded to 16 rows (the smallest ``tl.dot`` takes), so K and V are read once. Its
operands are fp32, which a GPU multiplies as TF32: exact for bf16 and fp16 values (TF32's
significand holds theirs), rounded for fp32 caches. (Triton's CPU interpreter multiplies
bf16 operands wrongly: errors of ~1e9 where fp32 operands agree with the reference.)

The tests compare it with transformers' eager attention in Triton's CPU interpreter
(``TRITON_INTERPRET=1``) and, where there is one, on a GPU (``scripts/gpu_check.sh``), and
compile it for Hopper and Ada here with the argument types inductor passes
(tests/test_triton_kernels_compile.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

CHUNK = 32  # positions per program
COMBINE_D = 64  # dims per program in the combining kernel


@triton.jit
def chunk_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, scale, blocked, positions, D, G,
                 q_b, q_h, q_d, k_b, k_h, k_l, v_b, v_h, v_l, mask_b,
                 GROUP: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """For one (batch, KV head, chunk): per query head of the group, the chunk's largest score
    ``m``, the sum ``l`` of exp(score - m) and those weights' sum of V rows ``acc``."""
    b, g, c = tl.program_id(0) // G, tl.program_id(0) % G, tl.program_id(1)
    chunks = tl.num_programs(1)
    pos = c * CHUNK + tl.arange(0, CHUNK)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    if HAS_MASK:  # additive; transformers blocks a position with the dtype's minimum
        bias = tl.load(mask_ptr + b * mask_b + pos, mask=pos < positions, other=float("-inf")).to(tl.float32)
        live = bias > blocked
    else:
        bias = tl.zeros([CHUNK], dtype=tl.float32)
        live = pos < positions
    rows = live[:, None] & (d[None, :] < D)
    # K and V loaded together, before any arithmetic: loads after the scores' reductions (and
    # their barriers) wait for them, a second trip to memory in a kernel of a few microseconds
    k = tl.load(k_ptr + b * k_b + g * k_h + pos[:, None] * k_l + d[None, :], mask=rows, other=0.0)
    v = tl.load(v_ptr + b * v_b + g * v_h + pos[:, None] * v_l + d[None, :], mask=rows, other=0.0)
    heads = g * GROUP + h
    q = tl.load(q_ptr + b * q_b + heads[:, None] * q_h + d[None, :] * q_d,
                mask=(h[:, None] < GROUP) & (d[None, :] < D), other=0.0)
    # inductor passes a float argument as fp64 (torch._inductor.config._use_fp64_for_unbacked_floats):
    # back to fp32, or tl.dot(p, v) below gets fp64 and fp32 operands and does not compile
    s = (tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale).to(tl.float32) + bias[None, :]
    s = tl.where(live[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])  # a chunk all blocked: p = 0, not nan
    acc = tl.dot(p, v.to(tl.float32))
    item = (b * G * GROUP + heads) * chunks + c
    tl.store(m_ptr + item, m, mask=h < GROUP)
    tl.store(l_ptr + item, tl.sum(p, axis=1), mask=h < GROUP)
    tl.store(acc_ptr + item[:, None] * BLOCK_D + d[None, :], acc, mask=h[:, None] < GROUP)


@triton.jit
def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, chunks, D, H, acc_d, out_b, out_h,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one (batch, query head) and BLOCK_D of its dims: the chunks' results, each rescaled
    by exp(its m - the largest). (All of a head's dims in one program, 8 programs on the 4B,
    took 4.5 us a layer on the H200, about as long as the chunks' kernel.)"""
    bh = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + bh * chunks + c, mask=c < chunks, other=float("-inf"))
    l = tl.load(l_ptr + bh * chunks + c, mask=c < chunks, other=0.0)
    acc = tl.load(acc_ptr + (bh * chunks + c[:, None]) * acc_d + d[None, :], mask=(c[:, None] < chunks) & (d[None, :] < D),
                  other=0.0)  # with m and l, before the reductions (see chunk_kernel)
    weight = tl.exp(m - tl.max(m, axis=0))  # 0 for blocked chunks (m = -inf)
    total = tl.sum(weight * l, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / total
    tl.store(out_ptr + (bh // H) * out_b + (bh % H) * out_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def launch(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float, chunk_kernel=chunk_kernel,
           combine_kernel=combine_kernel) -> Tensor:
    """Check the inputs as the CPU kernel does, then attention of ``query`` [batch, heads, 1,
    dim] over the cache ``key``/``value`` [batch, kv_heads, positions, dim], over the
    mask's first positions (all of them without a mask); returns [batch, 1, heads, dim]."""
    torch._check(query.dim() == 4 and query.shape[2] == 1,
                 lambda: "decode_attention: query must be [batch, heads, 1, dim]")
    torch._check(key.dim() == 4 and key.shape == value.shape,
                 lambda: "decode_attention: key and value must be [batch, kv_heads, positions, dim], alike")
    B, H, _, D = query.shape
    G, cached = key.shape[1], key.shape[2]
    torch._check(key.shape[0] == B and key.shape[3] == D and H % G == 0,
                 lambda: f"decode_attention: query {list(query.shape)} does not fit key {list(key.shape)}")
    torch._check(key.dtype == query.dtype and value.dtype == query.dtype,
                 lambda: "decode_attention: query, key and value must have one dtype")
    torch._check(key.stride(3) == 1 and value.stride(3) == 1,
                 lambda: "decode_attention: key and value rows must be contiguous")
    positions = mask.shape[-1] if mask is not None else cached
    torch._check(1 <= positions <= cached,
                 lambda: f"decode_attention: the mask covers {positions} positions, the cache has {cached}")
    mask_b = 0
    if mask is not None:
        torch._check(mask.dtype == query.dtype, lambda: "decode_attention: the mask must have the query's dtype")
        mask = mask.reshape(-1, positions).contiguous()
        torch._check(mask.shape[0] in (1, B), lambda: "decode_attention: one mask row, or one per batch, expected")
        mask_b = positions if mask.shape[0] == B else 0
    chunks, block_d = triton.cdiv(positions, CHUNK), triton.next_power_of_2(D)
    m, l = (torch.empty(B * H * chunks, dtype=torch.float32, device=query.device) for _ in range(2))
    acc = torch.empty(B * H * chunks * block_d, dtype=torch.float32, device=query.device)
    out = query.new_empty(B, 1, H, D)
    chunk_kernel[(B * G, chunks)](
        query, key, value, mask if mask is not None else query, m, l, acc, scale,
        torch.finfo(query.dtype).min, positions, D, G, query.stride(0), query.stride(1), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2), mask_b,
        GROUP=H // G, HAS_MASK=mask is not None, CHUNK=CHUNK, BLOCK_H=max(16, triton.next_power_of_2(H // G)),
        BLOCK_D=block_d)
    combine_d = min(COMBINE_D, block_d)
    combine_kernel[(B * H, block_d // combine_d)](m, l, acc, out, chunks, D, H, block_d, out.stride(0), out.stride(2),
                                                  BLOCK_C=max(16, triton.next_power_of_2(chunks)), BLOCK_D=combine_d)
    return out


@triton_op("gemma_opt::decode_attention_cuda", mutates_args=())
def decode_attention_cuda(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """One query token's attention over a KV cache, on CUDA (see the module)."""
    return launch(query, key, value, mask, scale, wrap_triton(chunk_kernel), wrap_triton(combine_kernel))
