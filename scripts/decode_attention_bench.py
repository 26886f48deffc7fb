"""Time of a decoded token's attention a layer on CPU: our kernel (``gemma_opt::decode_attention``)
against ``grouped_attention``'s two ``bmm`` calls, on the 270M's and the 4B's head layouts.
``grouped_attention`` runs eagerly here, so its mask, scale and softmax are separate ops
(the compiled step fuses those into one kernel; its ``bmm`` calls stay ATen's).

Each layer has its own bf16 K/V cache of 2048 positions (34 or 18 of them, as in a decode
step, so the positions read are not in a cache already); the step reads the first
``positions``. Best of five passes over the layers, after reading 256 MB to flush the caches.

    .venv/bin/python scripts/decode_attention_bench.py     # ~1 minute on 2 cores
"""

import time
from types import SimpleNamespace

import torch

from gemma_opt.compilation import grouped_attention
from gemma_opt.int8_gemv import cpu_ops

SHAPES = [  # name, layers, query heads, KV heads, positions read (a multiple of the 256 bucket)
    ("270M", 18, 4, 1, 256), ("4B", 34, 8, 4, 256), ("4B", 34, 8, 4, 1024), ("4B", 34, 8, 4, 2048)]


def best_pass(attend, caches) -> float:
    flush = torch.ones(64_000_000)
    times = []
    for _ in range(5):
        flush.sum()
        start = time.perf_counter()
        for key, value in caches:
            attend(key, value)
        times.append(time.perf_counter() - start)
    return min(times) / len(caches)


def main() -> None:
    torch.manual_seed(0)
    ours = cpu_ops().decode_attention
    print(f"{'model':>5} {'positions':>9}   us a layer: bmm     ours   ours GB/s (K+V)   ours/bmm")
    for name, layers, heads, kv_heads, positions in SHAPES:
        caches = [torch.randn(2, 1, kv_heads, 2048, 256, dtype=torch.bfloat16).unbind() for _ in range(layers)]
        query = torch.randn(1, heads, 1, 256, dtype=torch.bfloat16)
        mask = torch.zeros(1, 1, 1, positions, dtype=torch.bfloat16)
        module = SimpleNamespace(num_key_value_groups=heads // kv_heads)
        bmm = best_pass(lambda k, v: grouped_attention(module, query, k, v, mask, scaling=0.0625), caches)
        kernel = best_pass(lambda k, v: ours(query, k, v, mask, 0.0625), caches)
        read = 2 * kv_heads * positions * 256 * 2
        print(f"{name:>5} {positions:>9}   {bmm * 1e6:14.1f} {kernel * 1e6:8.1f} {read / kernel / 1e9:17.1f}"
              f"   {bmm / kernel:8.2f}x")


if __name__ == "__main__":
    main()
