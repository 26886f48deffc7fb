from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from gemma_opt.compilation import decode_attention
from gemma_opt.int8_gemv import cpu_ops, supported

pytestmark = pytest.mark.skipif(not supported("cpu"), reason="the decode-attention kernel needs a CPU with AVX-512 or AVX2")


def reference(query, key, value, mask, scale):
    """transformers' eager attention in float64, over the mask's first positions of the cache."""
    module = SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], training=False)
    positions = mask.shape[-1] if mask is not None else key.shape[2]
    key, value = key[:, :, :positions].double(), value[:, :, :positions].double()
    return eager_attention_forward(module, query.double(), key, value, None if mask is None else mask.double(),
                                   scaling=scale)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch, heads, kv_heads, dim, cache, positions", [
    (1, 4, 1, 256, 2048, 256),   # the 270M: one KV head, a 256-position bucket of its 2048 cache
    (1, 8, 4, 256, 2048, 1000),  # the 4B; a last chunk of 40 positions
    (2, 12, 2, 64, 300, 300),    # six heads a KV head (blocks of 4 and 2), two batch rows with their own masks
    (1, 2, 2, 32, 64, 1),        # the first position alone
])
def test_decode_attention_equals_eager_attention_over_the_masks_positions(dtype, batch, heads, kv_heads, dim, cache,
                                                                          positions):
    torch.manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, dtype=dtype)
    key, value = torch.randn(2, batch, kv_heads, cache, dim, dtype=dtype)
    keep = torch.rand(batch, 1, 1, positions) < 0.7
    keep[..., 64:128] = False  # a whole chunk masked out (sliding layers): it must weigh nothing
    keep[..., -1] = True  # the token itself
    mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-3}
    scale = dim**-0.5
    out = cpu_ops().decode_attention(query, key, value, mask, scale)
    assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(query, key, value, mask, scale), **tolerance)
    # no mask: all of the cache (an eager dynamic cache holds only the positions so far)
    window = key[:, :, :positions].contiguous(), value[:, :, :positions].contiguous()
    torch.testing.assert_close(cpu_ops().decode_attention(query, *window, None, scale).double(),
                               reference(query, *window, None, scale), **tolerance)


def test_decode_attention_runs_the_kernel_for_a_decoded_token_only():
    cpu_ops()  # built and registered (compile_decode does this before choosing decode_attention)
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, training=False)
    key, value = torch.randn(2, 1, 2, 40, 32)
    mask = torch.zeros(1, 1, 1, 40)
    with torch.profiler.profile() as prof:
        token = decode_attention(module, torch.randn(1, 8, 1, 32), key, value, mask, scaling=0.25)[0]
        prefill = decode_attention(module, torch.randn(1, 8, 3, 32), key, value, mask.expand(1, 1, 3, 40))[0]
        capped = decode_attention(module, torch.randn(1, 8, 1, 32), key, value, mask, softcap=50.0)[0]
    assert token.shape == capped.shape == (1, 1, 8, 32) and prefill.shape == (1, 3, 8, 32)
    assert [e.count for e in prof.key_averages() if e.key == "gemma_opt::decode_attention"] == [1]


def test_decode_attention_checks_its_inputs_and_has_a_fake_for_the_compiler():
    op = cpu_ops().decode_attention
    query, key = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 16, 32)
    with pytest.raises(RuntimeError, match="query must be \\[batch, heads, 1, dim\\]"):
        op(torch.randn(1, 4, 2, 32), key, key, None, 1.0)
    with pytest.raises(RuntimeError, match="dim a multiple of 32"):
        op(torch.randn(1, 4, 1, 16), key[..., :16], key[..., :16], None, 1.0)
    with pytest.raises(RuntimeError, match="the mask covers 17 positions, the cache has 16"):
        op(query, key, key, torch.zeros(1, 1, 1, 17), 1.0)
    with pytest.raises(RuntimeError, match="the mask must have the query's dtype"):
        op(query, key, key, torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16), 1.0)
    torch.library.opcheck(op.default, (query, key, key, torch.zeros(1, 1, 1, 8), 0.5),
                          test_utils=("test_schema", "test_faketensor"))
