"""Peak memory of calibrated pruning (wanda / owl) on the gemma-3-4b-it architecture,
random weights, on this CPU: is it bounded (hooks sum norms; only one block's hidden
states are kept) and does it fit a 24 GB machine?

    .venv/bin/python scripts/calibration_memory.py [--choice owl-wanda] [--tokens 1022]

Prints resident memory after loading, the peak during pruning (the kernel's high-water
mark, reset after loading), and the time.
"""

import argparse
import re
import time
from pathlib import Path

from gemma_opt.config import SPARSITY_CHOICES, PruneConfig
from gemma_opt.filtering import build_filter_map
from gemma_opt.models import load_model
from gemma_opt.pruning import prune


def status_gb(field: str) -> float:
    kb = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)
    return int(kb) / 1e6


parser = argparse.ArgumentParser()
parser.add_argument("--model", default="gemma-3-4b-arch")
parser.add_argument("--choice", default="owl-wanda", choices=list(SPARSITY_CHOICES))
parser.add_argument("--ratio", type=float, default=0.5)
parser.add_argument("--tokens", type=int, default=1022, help="calibration tokens (511 per sequence)")
args = parser.parse_args()

start = time.perf_counter()
loaded = load_model(args.model)
load_s = time.perf_counter() - start
after_load, load_peak = status_gb("VmRSS"), status_gb("VmHWM")
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
config = PruneConfig(**SPARSITY_CHOICES[args.choice], ratio=args.ratio, calibration_tokens=args.tokens)
report = prune(loaded.model, build_filter_map(loaded.model), config, loaded.tokenizer)
print(f"| model | method | calibration tokens | RSS after load | peak while pruning | extra | prune s |\n"
      f"|---|---|---|---|---|---|---|\n"
      f"| {args.model} | {args.choice} {args.ratio:g} | {args.tokens} | {after_load:.2f} GB "
      f"| {status_gb('VmHWM'):.2f} GB | {status_gb('VmHWM') - after_load:+.2f} GB | {report.seconds:.0f} |")
print(f"(load: {load_s:.0f} s, peak while loading {load_peak:.2f} GB; achieved sparsity {report.overall:.3f})")
