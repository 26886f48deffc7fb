"""The CUDA INT8 GEMV (Triton): on a GPU for real; without one, the kernel runs in Triton's CPU
interpreter, which must be switched on before Triton is imported: `make test` runs this file a
second time with TRITON_INTERPRET=1. The op's tracing test runs in the first pass (under the
interpreter, `wrap_triton` asks for a GPU driver)."""

import os

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; `make test` installs it")

from gemma_opt.int8_gemv_cuda import CONFIGS, config_name, int8_gemv_kernel, launch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_KERNELS = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                  reason="needs a CUDA GPU or TRITON_INTERPRET=1 (`make test`'s second pass)")
ON_GPU = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def exact(x, weight, scale):
    return x.double() @ (weight.double() * scale.double()[:, None]).T


def random_inputs(rows, cols, dtype, x_shape):
    torch.manual_seed(0)
    weight = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=DEVICE)  # the whole int8 range
    return torch.randn(*x_shape, cols, dtype=dtype, device=DEVICE), weight, torch.rand(rows, device=DEVICE) / 64


@RUNS_KERNELS
@pytest.mark.parametrize("config", CONFIGS, ids=config_name)
@pytest.mark.parametrize("rows, cols, x_shape", [(37, 100, (3,)), (64, 4304, (1, 1))])  # row and column tails
def test_every_tiling_equals_the_dequantized_matmul(config, rows, cols, x_shape):
    x, weight, scale = random_inputs(rows, cols, torch.bfloat16, x_shape)
    out = launch(int8_gemv_kernel, x, weight, scale, **config.kwargs, num_warps=config.num_warps)
    assert out.shape == (*x_shape, rows) and out.dtype == torch.bfloat16
    # the interpreter truncates to bf16 where the GPU rounds to nearest: one bf16 step of slack
    torch.testing.assert_close(out, exact(x, weight, scale).to(torch.bfloat16), rtol=8e-3, atol=1e-4)


@RUNS_KERNELS
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes(dtype):
    x, weight, scale = random_inputs(1027, 2560, dtype, (1,))
    out = launch(int8_gemv_kernel, x, weight, scale, **CONFIGS[0].kwargs)
    torch.testing.assert_close(out, exact(x, weight, scale).to(dtype), rtol=1e-5 if dtype == torch.float32 else 2e-3,
                               atol=1e-4)


@RUNS_KERNELS
def test_inputs_are_checked_as_on_the_cpu():
    x, weight, scale = random_inputs(8, 32, torch.bfloat16, (1,))
    config = CONFIGS[0].kwargs
    with pytest.raises(RuntimeError, match="x has 16 features, weight has 32"):
        launch(int8_gemv_kernel, x[:, :16], weight, scale, **config)
    with pytest.raises(RuntimeError, match="one scale per weight row"):
        launch(int8_gemv_kernel, x, weight, scale[:4], **config)
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        launch(int8_gemv_kernel, x.double(), weight, scale, **config)


@pytest.mark.skipif(INTERPRETED, reason="under the interpreter, wrap_triton asks for a GPU driver")
def test_the_op_traces_into_a_graph_with_fake_tensors_as_torch_compile_needs():
    from torch.fx.experimental.proxy_tensor import make_fx

    x, weight, scale = random_inputs(64, 256, torch.bfloat16, (1, 1))
    graph = make_fx(lambda x, w, s: torch.ops.gemma_opt.int8_gemv_cuda(x, w, s) * 2, tracing_mode="fake")(x, weight, scale)
    calls = [node for node in graph.graph.nodes if node.target is torch.ops.gemma_opt.int8_gemv_cuda.default]
    assert len(calls) == 1 and calls[0].meta["val"].shape == (1, 1, 64) and calls[0].meta["val"].dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="x has 128 features, weight has 256"):
        make_fx(torch.ops.gemma_opt.int8_gemv_cuda, tracing_mode="fake")(x[..., :128], weight, scale)


@ON_GPU
def test_the_autotuned_op_runs_compiled_under_cuda_graphs_and_rounds_once():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from gemma_opt.int8_gemv import Int8GemvLinear, use_int8_gemv

    x, weight, scale = random_inputs(1024, 2560, torch.bfloat16, (1, 1))
    torch.library.opcheck(torch.ops.gemma_opt.int8_gemv_cuda.default, (x, weight, scale),
                          test_utils=("test_schema", "test_faketensor"))
    model = nn.Sequential(nn.Linear(2560, 2048, bias=False, dtype=torch.bfloat16, device=DEVICE))
    quantize_(model, Int8WeightOnlyConfig())
    with torch.no_grad():
        expected = exact(x, model[0].weight.qdata, model[0].weight.scale.reshape(-1))
        torchao_out = model(x)
        assert use_int8_gemv(model) == 1 and isinstance(model[0], Int8GemvLinear)
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        outs = [compiled(x).clone() for _ in range(3)]  # warm-up, record, replay of the CUDA graph
    for out in outs:  # rounded once: at least as close to the exact product as torchao's
        assert (out.double() - expected).abs().max() <= (torchao_out.double() - expected).abs().max()
