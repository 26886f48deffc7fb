"""Read rate of the CPU INT8 GEMV kernels on the 4B architecture's matrix shapes.

For each shape, enough distinct weight matrices to fill ~600 MB (so none sits in the cache,
as in a real decode step), and the best of five passes over them, interleaved, for:
ATen's ``_weight_int8pack_mm`` (what torchao's INT8 linear reaches once compiled), ours
(``gemma_opt.int8_gemv``), and a plain ``sum`` over the same bytes (the read rate to aim at).

    .venv/bin/python scripts/int8_gemv_bench.py
"""

import time

import torch

from gemma_opt.int8_gemv import int8_gemv

SHAPES = {"q_proj": (2048, 2560), "k/v_proj": (1024, 2560), "o_proj": (2560, 2048), "gate/up_proj": (10240, 2560),
          "down_proj": (2560, 10240), "lm_head": (262144, 2560)}


def main() -> None:
    torch.manual_seed(0)
    print(f"{'matrix':>13} {'out x in':>13}   GB/s: {'aten':>5} {'ours':>5} {'sum':>5}   ours/aten")
    for name, (rows, cols) in SHAPES.items():
        weights = [torch.randint(-127, 128, (rows, cols), dtype=torch.int8) for _ in range(max(1, 600_000_000 // (rows * cols)))]
        scale = torch.rand(rows, dtype=torch.bfloat16) / 64
        x = torch.randn(1, cols, dtype=torch.bfloat16)
        torch.testing.assert_close(int8_gemv(x, weights[0], scale), torch._weight_int8pack_mm(x, weights[0], scale),
                                   rtol=0.02, atol=0.02 * scale.max().item() * cols ** 0.5)
        kernels = {"aten": lambda w: torch._weight_int8pack_mm(x, w, scale), "ours": lambda w: int8_gemv(x, w, scale),
                   "sum": lambda w: w.view(torch.float32).sum()}
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(5):
            for kernel, run in kernels.items():
                start = time.perf_counter()
                for w in weights:
                    run(w)
                best[kernel] = min(best[kernel], (time.perf_counter() - start) / len(weights))
        rate = {kernel: rows * cols / seconds / 1e9 for kernel, seconds in best.items()}
        print(f"{name:>13} {f'{rows}x{cols}':>13}         {rate['aten']:5.1f} {rate['ours']:5.1f} {rate['sum']:5.1f}"
              f"   {rate['ours'] / rate['aten']:.2f}x")


if __name__ == "__main__":
    main()
