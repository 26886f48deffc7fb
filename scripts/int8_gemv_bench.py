"""Read rate of the INT8 GEMV kernels on the 4B architecture's matrix shapes, CPU or CUDA.

For each shape, enough distinct weight matrices to fill ~600 MB (so none sits in a cache,
as in a real decode step), and the best of five passes over them, interleaved, for: ours
(``gemma_opt.int8_gemv``), what torchao's INT8 linear reaches once compiled (on CPU ATen's
``_weight_int8pack_mm``, called directly; on CUDA torchao's own linear on an ``Int8Tensor``,
compiled with the inductor settings ``quantize_`` sets), and a plain ``sum`` over the same bytes (the read rate to
aim at); on CUDA also bf16 weights through cuBLAS, at their own (twice the) bytes.

    .venv/bin/python scripts/int8_gemv_bench.py            # ~1 minute on 2 cores
    python3 scripts/int8_gemv_bench.py --device cuda       # in scripts/gpu_check.sh
"""

import argparse
import time

import torch
from torch.nn import functional as F
from torchao.quantization import Int8Tensor

from gemma_opt.int8_gemv import int8_gemv

SHAPES = {"q_proj": (2048, 2560), "k/v_proj": (1024, 2560), "o_proj": (2560, 2048), "gate/up_proj": (10240, 2560),
          "down_proj": (2560, 10240), "lm_head": (262144, 2560),
          # q, k and v as one matrix, gate and up as one: what the decode step runs (int8_gemv.fuse_projections)
          "qkv_fused": (4096, 2560), "gate_up_fused": (20480, 2560)}


def torchao_compiled(device: str, x, scale):
    """torchao's INT8 weight-only linear as it runs in the compiled decode step (on CPU the
    ATen kernel inductor makes of it, called directly: no per-call overhead of a compiled
    function on the small matrices)."""
    if device == "cpu":
        return lambda w: torch._weight_int8pack_mm(x, w, scale)
    from torchao.quantization.utils import recommended_inductor_config_setter

    recommended_inductor_config_setter()  # what quantize_ sets: coordinate descent tuning, fused one-row mm
    linear = torch.compile(F.linear, dynamic=False)
    return lambda w: linear(x, Int8Tensor(w, scale, [1, w.shape[1]], x.dtype))


def one_pass(device: str, run, weights):
    """One call per matrix; on CUDA recorded as a CUDA graph, so that the GPU time is measured
    and not Python's launch time (a K/V projection reads 2.6 MB: about a microsecond)."""
    if device == "cpu":
        return lambda: [run(w) for w in weights]
    run(weights[0])  # autotuning and compilation happen outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            run(w)

    def replay():
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
    return replay


def tiling_rates(rows: int, cols: int) -> str:
    """On CUDA, each tiling's read rate as Triton's autotuner measured it for this shape (GB/s,
    median; the kernel runs the fastest), for the next round of tilings."""
    from gemma_opt.int8_gemv_cuda import autotuned_kernel, config_name

    timings = {config_name(c): t[0] if isinstance(t, list) else t
               for c, t in getattr(autotuned_kernel, "configs_timings", {}).items()}
    return "  tilings GB/s: " + ", ".join(
        f"{name} {rows * cols / ms / 1e6:.0f}" for name, ms in sorted(timings.items(), key=lambda kv: kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {', '.join(SHAPES)}, or OUTxIN "
                        "(the 270M's q, k/v and q/k/v fused: 1024x640,256x640,1536x640)")
    args = parser.parse_args()
    device = args.device
    shapes = {name: SHAPES.get(name) or tuple(map(int, name.split("x"))) for name in args.shapes.split(",")}
    torch.manual_seed(0)
    names = ["torchao", "ours", "sum"] + (["bf16"] if device == "cuda" else [])
    print(f"{'matrix':>13} {'out x in':>13}   GB/s: " + " ".join(f"{n:>7}" for n in names) + "   ours/torchao")
    for name, (rows, cols) in shapes.items():
        count = max(1, 600_000_000 // (rows * cols))
        weights = [torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device=device) for _ in range(count)]
        scale = torch.rand(rows, dtype=torch.bfloat16, device=device) / 64
        x = torch.randn(1, cols, dtype=torch.bfloat16, device=device)
        kernels = {"torchao": torchao_compiled(device, x, scale), "ours": lambda w: int8_gemv(x, w, scale),
                   "sum": lambda w: w.view(torch.float32).sum()}
        torch.testing.assert_close(kernels["ours"](weights[0]), kernels["torchao"](weights[0]),
                                   rtol=0.02, atol=0.02 * scale.max().item() * cols ** 0.5)
        if device == "cuda":  # the check above ran ours first for this shape: Triton tuned it then
            print(tiling_rates(rows, cols))
        inputs = dict.fromkeys(kernels, weights)
        if device == "cuda":
            inputs["bf16"] = [torch.randn(rows, cols, dtype=torch.bfloat16, device=device) for _ in range(count)]
            kernels["bf16"] = lambda w: x @ w.t()
        passes = {kernel: one_pass(device, run, inputs[kernel]) for kernel, run in kernels.items()}
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(5):
            for kernel, run_pass in passes.items():
                start = time.perf_counter()
                run_pass()
                best[kernel] = min(best[kernel], (time.perf_counter() - start) / count)
        rate = {k: inputs[k][0].nbytes / seconds / 1e9 for k, seconds in best.items()}
        print(f"{name:>13} {f'{rows}x{cols}':>13}         " + " ".join(f"{rate[n]:7.1f}" for n in names)
              + f"   {rate['ours'] / rate['torchao']:.2f}x")


if __name__ == "__main__":
    main()
