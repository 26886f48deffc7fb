"""Which dimension should `layer_norm` prune? Perplexity of the real Gemma 3 270M after
pruning 30% by L2 norm in one group of projections at a time (the rest dense).

    .venv/bin/python scripts/layer_norm_ablation.py
"""

from gemma_opt.evaluation import perplexity
from gemma_opt.filtering import build_filter_map
from gemma_opt.models import load_model
from gemma_opt.pruning import apply_masks_, layer_norm_masks, norm_mask

RATIO = 0.3


def norm_masks(by_column):
    return lambda modules, ratio: {n: norm_mask(m.weight, ratio, by_column) for n, m in modules.items()}


GROUPS = {
    "MLP neurons (gate/up rows + down columns)": (".mlp.", layer_norm_masks),
    "q_proj output rows": ("q_proj", layer_norm_masks),
    "k_proj output rows": ("k_proj", layer_norm_masks),
    "v_proj output rows + o_proj input columns": (("v_proj", "o_proj"), layer_norm_masks),
    "q/k/v input columns (residual channels)": (("q_proj", "k_proj", "v_proj"), norm_masks(by_column=True)),
    "o_proj output rows (residual channels)": ("o_proj", norm_masks(by_column=False)),
}

dense = load_model("gemma-3-270m")
print(f"| pruned ({RATIO:.0%} by L2 norm) | perplexity |\n|---|---|\n| nothing (dense) | {perplexity(dense.model, dense.tokenizer):.1f} |")
for name, (match, masks_of) in GROUPS.items():
    loaded = load_model("gemma-3-270m")
    keys = (match,) if isinstance(match, str) else match
    group = {n: m for n, m in build_filter_map(loaded.model).modules.items() if any(k in n for k in keys)}
    apply_masks_(group, masks_of(group, RATIO))
    print(f"| {name} | {perplexity(loaded.model, loaded.tokenizer):.4g} |")
