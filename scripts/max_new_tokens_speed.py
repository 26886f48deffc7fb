"""Does a generous ``max_new_tokens`` slow decoding down? The default pipeline on the real
270M, the first 100 tokens of greedy requests whose ``max_new_tokens`` fits the static
cache (512) or not (4096), alternating, in one process.

    .venv/bin/python scripts/max_new_tokens_speed.py [--model gemma-3-270m] [--rounds 4]

Prints each request's decode rate and the medians.
"""

import argparse
import itertools
import statistics

from gemma_opt.config import PipelineConfig
from gemma_opt.generation import GenerationStats, SamplingParams, build_inputs, stream
from gemma_opt.models import load_model
from gemma_opt.pipeline import optimize

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="gemma-3-270m")
parser.add_argument("--rounds", type=int, default=4)
args = parser.parse_args()

loaded = load_model(args.model)
optimize(loaded, PipelineConfig.validated({"model": args.model}))
rates = {512: [], 4096: []}
for max_new_tokens in [4096, 512] * args.rounds:
    stats = GenerationStats()
    inputs = build_inputs(loaded, "Write a long story about a lighthouse.", max_new_tokens=max_new_tokens)
    tokens = stream(loaded, inputs, SamplingParams(max_new_tokens, temperature=0, stop_at_eos=False), stats)
    for _ in itertools.islice(tokens, 100):
        pass
    tokens.close()  # a client that stops reading: the rest is never computed
    rates[max_new_tokens].append(stats.decode_tokens_per_s)
    print(f"max_new_tokens={max_new_tokens}: {stats.output_tokens} tokens at {stats.decode_tokens_per_s:.2f} tokens/s")
print(", ".join(f"max_new_tokens={n}: median {statistics.median(r):.2f} tokens/s" for n, r in rates.items()))
