"""The filter map: which modules every later stage (prune, quantize) touches.

Default: the language model's decoder linears (q, k, v, o, gate, up, down). Never by
default: embeddings, norms, the LM head (tied to the embeddings, so pruning it would
prune the input embedding too), the multimodal projector, and the vision tower
(``include_vision`` adds it). ``include``/``exclude`` are fnmatch patterns over module
names; a pattern that matches nothing is a typo and raises.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from .config import ConfigError, FilterConfig

DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")
VISION_TOWER = "vision_tower"


@dataclass
class FilterMap:
    modules: dict[str, nn.Linear]  # in model order

    def filter_fn(self, module: nn.Module, fqn: str) -> bool:
        """torchao's ``quantize_(..., filter_fn=)`` signature."""
        return fqn in self.modules

    def __len__(self) -> int:
        return len(self.modules)


def build_filter_map(model: nn.Module, config: FilterConfig | None = None) -> FilterMap:
    config = config or FilterConfig()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {n for n in linears if DECODER_LINEAR.search(n) and VISION_TOWER not in n}
    if config.include_vision:
        chosen |= {n for n in linears if VISION_TOWER in n}
    for pattern in config.include:
        matched = fnmatch.filter(linears, pattern)
        if not matched:
            raise ConfigError(f"filter include pattern {pattern!r} matches no linear module")
        chosen.update(matched)
    for pattern in config.exclude:
        matched = fnmatch.filter(chosen, pattern)
        if not matched:
            raise ConfigError(f"filter exclude pattern {pattern!r} matches no selected module")
        chosen.difference_update(matched)
    if not chosen:
        raise ConfigError("the filter map selects no module")
    return FilterMap({n: m for n, m in linears.items() if n in chosen})


def repeated_blocks(model: nn.Module, vision: bool = False) -> dict[str, nn.Module]:
    """The decoder layers of the language model (and the vision encoder's, if asked)."""
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and (vision or VISION_TOWER not in name):
            blocks.update({f"{name}.{i}": layer for i, layer in enumerate(module)})
    return blocks
