"""The CUDA decode-attention kernels (Triton): on a GPU for real; without one, in Triton's CPU
interpreter (`make test`'s second pass, TRITON_INTERPRET=1, as for the INT8 GEMV)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; `make test` installs it")

from gemma_opt.decode_attention_cuda import launch  # noqa: E402
from test_decode_attention import reference  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_KERNELS = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                  reason="needs a CUDA GPU or TRITON_INTERPRET=1 (`make test`'s second pass)")


def blocked(keep, dtype):
    return torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)


@RUNS_KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, dim, cache, positions", [
    (1, 8, 4, 256, 2048, 2048),  # the 4B on a GPU: the mask covers the whole cache
    (2, 12, 2, 64, 300, 200),    # six heads a KV head, two batch rows with their own masks, a short mask
    (1, 2, 2, 40, 64, 1),        # the first position alone; a dim that is not a power of 2
])
def test_decode_attention_equals_eager_attention_over_the_masks_positions(dtype, batch, heads, kv_heads, dim, cache,
                                                                          positions):
    torch.manual_seed(0)
    query = torch.randn(batch, dim, heads, 1, dtype=dtype, device=DEVICE).permute(0, 2, 3, 1)  # dim not innermost
    key, value = torch.randn(2, batch, kv_heads, cache, dim, dtype=dtype, device=DEVICE)
    keep = torch.rand(batch, 1, 1, positions, device=DEVICE) < 0.7
    keep[..., 64:192] = False  # whole chunks blocked (a sliding layer's window): they must weigh nothing
    keep[..., -1] = True  # the token itself
    # a view into a wider mask, its rows not contiguous (`launch` copies them)
    mask = torch.cat([blocked(keep, dtype), blocked(keep[..., :8], dtype)], -1)[..., :positions]
    # float32: TF32 products on a GPU (exact in the interpreter); bf16: the output's rounding
    tolerance = {"rtol": 1e-2, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 4e-3}
    scale = dim**-0.5
    out = launch(query, key, value, mask, scale)
    assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(query, key, value, mask, scale), **tolerance)
    # no mask: all of the cache (an eager dynamic cache holds only the positions so far); query contiguous
    query, window = query.contiguous(), (key[:, :, :positions].contiguous(), value[:, :, :positions].contiguous())
    torch.testing.assert_close(launch(query, *window, None, scale).double(), reference(query, *window, None, scale),
                               **tolerance)


@RUNS_KERNELS
def test_blocked_positions_never_reach_the_result_even_as_nan_or_inf():
    """(Whether they are read at all is a question of speed: gpu_check times it.)"""
    torch.manual_seed(0)
    query = torch.randn(1, 8, 1, 256, dtype=torch.bfloat16, device=DEVICE)
    key, value = torch.randn(2, 1, 4, 2048, 256, dtype=torch.bfloat16, device=DEVICE)
    keep = torch.zeros(1, 1, 1, 2048, dtype=torch.bool, device=DEVICE)
    keep[..., :200] = True  # a 200-token request in a 2048-position cache
    clean = launch(query, key, value, blocked(keep, torch.bfloat16), 0.0625)
    key[:, :, 200:], value[:, :, 200:] = float("nan"), float("inf")
    assert torch.equal(launch(query, key, value, blocked(keep, torch.bfloat16), 0.0625), clean)


@RUNS_KERNELS
def test_inputs_are_checked_as_on_the_cpu():
    query, key = torch.randn(1, 4, 1, 32, device=DEVICE), torch.randn(1, 2, 16, 32, device=DEVICE)
    with pytest.raises(RuntimeError, match="query must be \\[batch, heads, 1, dim\\]"):
        launch(torch.randn(1, 4, 2, 32, device=DEVICE), key, key, None, 1.0)
    with pytest.raises(RuntimeError, match="does not fit key"):
        launch(torch.randn(1, 3, 1, 32, device=DEVICE), key, key, None, 1.0)
    with pytest.raises(RuntimeError, match="the mask covers 17 positions, the cache has 16"):
        launch(query, key, key, torch.zeros(1, 1, 1, 17, device=DEVICE), 1.0)
    with pytest.raises(RuntimeError, match="the mask must have the query's dtype"):
        launch(query, key, key, torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16, device=DEVICE), 1.0)


@pytest.mark.skipif(INTERPRETED, reason="under the interpreter, wrap_triton asks for a GPU driver")
def test_the_op_traces_into_a_graph_with_fake_tensors_as_torch_compile_needs():
    from torch.fx.experimental.proxy_tensor import make_fx

    op = torch.ops.gemma_opt.decode_attention_cuda  # registered by importing the module (above)
    query, key = torch.randn(1, 8, 1, 256, dtype=torch.bfloat16), torch.randn(1, 4, 2048, 256, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 2048, dtype=torch.bfloat16)
    graph = make_fx(lambda q, k, v, m: op(q, k, v, m, 0.0625) * 2, tracing_mode="fake")(query, key, key, mask)
    calls = [node for node in graph.graph.nodes if node.target is op.default]
    assert len(calls) == 1 and calls[0].meta["val"].shape == (1, 1, 8, 256)
    with pytest.raises(RuntimeError, match="the mask covers 2049 positions, the cache has 2048"):
        make_fx(lambda q, k, m: op(q, k, k, m, 0.0625), tracing_mode="fake")(query, key, torch.zeros(1, 1, 1, 2049))


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor compiles Triton kernels for a GPU only")
def test_the_op_compiled_by_inductor_equals_its_eager_launch():
    """Inductor passes the float scale as fp64 (session 20's first H200 bench failed to compile
    on it); the tests above launch the kernels directly, with an fp32 scale."""
    torch.manual_seed(0)
    query = torch.randn(1, 8, 1, 256, dtype=torch.bfloat16, device=DEVICE)
    key, value = torch.randn(2, 1, 4, 2048, 256, dtype=torch.bfloat16, device=DEVICE)
    keep = torch.arange(2048, device=DEVICE) < 300
    mask = blocked(keep, torch.bfloat16).reshape(1, 1, 1, 2048)
    op = torch.ops.gemma_opt.decode_attention_cuda
    compiled = torch.compile(lambda q, k, v, m: op(q, k, v, m, 0.0625) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(query, key, value, mask), launch(query, key, value, mask, 0.0625) * 2)
