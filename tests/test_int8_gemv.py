from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

from gemma_opt.cpu_matmul import CPU_MATMUL_DTYPE
from gemma_opt.int8_gemv import Int8GemvLinear, int8_gemv, kernel, supported, use_int8_gemv
from gemma_opt.quantization import weight_bytes

pytestmark = pytest.mark.skipif(not supported("cpu"), reason="the INT8 GEMV kernel needs a CPU with AVX-512 or AVX2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, cols", [(37, 100), (64, 4304), (1027, 2560)])  # row and column tails; a real shape
def test_int8_gemv_equals_the_dequantized_matmul_rounded_once(dtype, rows, cols):
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scale = torch.rand(rows, 1) / 64
    for x in (torch.randn(1, 1, cols, dtype=dtype), torch.randn(3, cols, dtype=dtype)):  # a decoded token; 3 rows
        expected = x.double() @ (weight.double() * scale.double()).T
        out = int8_gemv(x, weight, scale)
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(out, expected.to(dtype), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-4)


def test_the_cpu_kernels_are_built_for_the_isa_torch_reports():
    """`make test` runs this file a second time with ATEN_CPU_CAPABILITY=avx2: there the AVX2
    build must be the one loaded, on a CPU with AVX-512 too."""
    kernel("cpu")
    isa = "avx512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "avx2"
    built = [Path(library).name for library in torch.ops.loaded_libraries if "gemma_opt_cpu_kernels" in library]
    assert built == [f"gemma_opt_cpu_kernels_{isa}.so"]


def test_int8_gemv_checks_its_inputs_and_has_a_fake_for_the_compiler():
    weight, scale = torch.randint(-127, 128, (8, 32), dtype=torch.int8), torch.rand(8)
    with pytest.raises(RuntimeError, match="x has 16 features, weight has 32"):
        int8_gemv(torch.randn(1, 16), weight, scale)
    with pytest.raises(RuntimeError, match="one scale per weight row"):
        int8_gemv(torch.randn(1, 32), weight, scale[:4])
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        int8_gemv(torch.randn(1, 32, dtype=torch.float64), weight, scale)
    torch.library.opcheck(kernel("cpu").default, (torch.randn(1, 1, 32), weight, scale),
                          test_utils=("test_schema", "test_faketensor"))


def test_use_int8_gemv_swaps_int8_linears_and_keeps_their_weights_and_prefill_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, dtype=torch.bfloat16), nn.Linear(96, 32, bias=False, dtype=torch.bfloat16))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn == "0")  # the second stays bf16
    first, state, size = model[0], model.state_dict(), weight_bytes(model)
    prompt, token = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():  # torchao's, as this CPU computes a prompt's product (CPU_MATMUL_DTYPE)
        matmul_dtype = CPU_MATMUL_DTYPE.get(prompt.dtype, prompt.dtype)
        prefill, decoded = model[1](first(prompt.to(matmul_dtype)).to(prompt.dtype)), first(token)

        assert use_int8_gemv(nn.Sequential(nn.Linear(64, 64))) == 0  # nothing in INT8: nothing to swap
        assert use_int8_gemv(model) == 1
        assert isinstance(model[0], Int8GemvLinear) and type(model[1]) is nn.Linear
        assert isinstance(model[0].weight, Int8Tensor) and model[0].weight is first.weight
        assert model.state_dict().keys() == state.keys() and weight_bytes(model) == size  # buffers share the weight
        assert torch.equal(model(prompt), prefill)  # several rows: torchao's own path
        exact = token.double() @ first.weight.dequantize().double().T + first.bias.double()
        out = model[0](token)
    assert (out.double() - exact).abs().max() <= (decoded.double() - exact).abs().max()  # rounded once, not twice


def test_a_prompt_converts_every_weight_into_one_buffer_and_computes_what_torchao_computes():
    """torchao's path makes a new bf16 copy of the weight on every prefill call (fresh pages for
    a large one); ours converts each weight into one buffer the model's linears share. Where
    the CPU has no fast bf16 matmul (the third pass of `make test` makes one so), the product
    is torchao's on the input in float32, rounded to bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False), nn.Linear(96, 160), nn.Linear(160, 32, bias=False))
    quantize_(model.to(torch.bfloat16), Int8WeightOnlyConfig())
    weights = [linear.weight for linear in model]
    assert use_int8_gemv(model) == 3
    buffers = {id(linear.dequant) for linear in model}
    x = torch.randn(2, 5, 64)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):  # the buffer follows the activations' dtype
        h, expected, matmul_dtype = x.to(dtype), x.to(dtype), CPU_MATMUL_DTYPE.get(dtype, dtype)
        with torch.inference_mode():
            for linear, weight in zip(model, weights):
                h, expected = linear(h), F.linear(expected.to(matmul_dtype), weight, linear.bias).to(dtype)  # torchao's
                assert torch.equal(h, expected) and h.dtype == dtype
        buffer = model[0].dequant.buffer
        assert len(buffers) == 1 and buffer.dtype == matmul_dtype and buffer.numel() == 160 * 96  # the largest weight
        if dtype == torch.float32:
            continue
        with torch.inference_mode():
            model(x.to(dtype))
        assert model[0].dequant.buffer is buffer  # reused, not made again


def test_a_prompt_s_path_compiles_as_one_graph():
    """`compile.vision` compiles the vision layers, whose INT8 linears take the prompt's path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, dtype=torch.bfloat16), nn.GELU(), nn.Linear(96, 32, dtype=torch.bfloat16))
    quantize_(model, Int8WeightOnlyConfig())
    assert use_int8_gemv(model) == 2
    prompt = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        eager, compiled = model(prompt), torch.compile(model, fullgraph=True)(prompt)
    torch.testing.assert_close(compiled, eager, rtol=0.05, atol=0.02)
