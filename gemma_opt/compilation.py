"""Selective (regional) ``torch.compile``: the repeated decoder block, compiled once and
reused by every layer, instead of the whole model's forward.

``CompileFriendlyCache`` keeps the KV-cache update out of the graph, so the MLP and the
rest of the block compile to graphs that every layer shares. The only per-layer graphs
are the small ones ending at the cache update, which transformers calls with the
layer's ``layer_idx`` (dynamo specialises on it); the recompile limit is raised to fit
them. The warm-up runs two prompt lengths, after which the sequence dimension is
dynamic and requests of any length reuse the same graphs.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from .config import CompileConfig
from .filtering import repeated_blocks
from .generation import SamplingParams, generate_text
from .models import LoadedModel

WARMUP_PROMPTS = ("Hi", "Describe the weather on a quiet autumn morning, in a few words.")


def compile_blocks(model: nn.Module, config: CompileConfig) -> list[str]:
    """Compile each repeated block in place (``nn.Module.compile``); returns their names."""
    if config.mode == "none":
        return []
    blocks = repeated_blocks(model, config.vision)
    # Per layer: prefill, decode and dynamic-length versions of the graph before the cache update.
    options = {"backend": config.backend, "recompile_limit": 4 * len(blocks)}
    if config.mode != "default":
        options["mode"] = config.mode
    for block in blocks.values():
        block.compile(**options)
    return list(blocks)


def warm_up(loaded: LoadedModel) -> None:
    """Generate a few tokens for two prompt lengths (with and without an image), so that
    compilation happens here and not in the first request."""
    images = [None, Image.new("RGB", (64, 64), (128, 96, 64))] if loaded.has_vision else [None]
    for image in images:
        for prompt in WARMUP_PROMPTS:
            generate_text(loaded, prompt, image, SamplingParams(max_new_tokens=4, temperature=0))


def compile_counters() -> dict[str, int]:
    """dynamo's counts of compiled graphs, for checking that nothing recompiles."""
    from torch._dynamo.utils import counters

    return dict(counters["stats"])
