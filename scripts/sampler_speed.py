"""How long the sampler takes for one token over Gemma's 262,208-entry vocabulary, the
sampler alone (``generation._sampler``, no model), on near-flat random logits (``randn * 3``,
the hard case for top-p), at temperature 1.

    .venv/bin/python scripts/sampler_speed.py [--device cpu] [--repeats 5]

Prints the best of ``--repeats`` means of 50 draws, in ms, for the service's default top-k
and top-p, top-k 0 with top-p 0.95, and top-k 0 with top-p 1 (a draw over every token).
"""

import argparse
import timeit

import torch

from gemma_opt.generation import SamplingParams, _sampler

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--repeats", type=int, default=5)
args = parser.parse_args()

torch.manual_seed(0)
logits = (torch.randn(1, 262208, device=args.device) * 3).bfloat16()
for top_k, top_p in [(64, 0.95), (0, 0.95), (0, 1.0)]:
    sample = _sampler(SamplingParams(top_k=top_k, top_p=top_p))

    def draw():
        sample(logits, None).tolist()  # waits for a GPU
    draw()
    best = min(timeit.repeat(draw, number=50, repeat=args.repeats)) / 50
    print(f"top_k={top_k} top_p={top_p}: {best * 1e3:.2f} ms a token")
