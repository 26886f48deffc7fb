"""Selective ``torch.compile``: the per-token decode step, where serving time goes.

Prefill runs once per request and stays eager; every generated token runs the
language model's decode step, and that is what gets compiled: one token at a time
against a static KV cache of ``cache_len`` positions, so the step has the same shapes
in every request whatever its prompt length or ``max_new_tokens``, and one set of
graphs serves them all. transformers' ``generate()`` does exactly this when the model
has a ``CompileConfig`` and the cache is static; we enable it on CPU as well.

Gemma 3's sliding-window cache layers count their length in a Python int, which
dynamo specialises on: the first decode step compiles, the second recompiles with
that int symbolic, and the cache becoming full (past the window) compiles once more.
The warm-up walks through all three, so no request compiles. The vision encoder's
layers, run once per image, can be compiled regionally (``vision``).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import StaticCache
from transformers.generation.configuration_utils import CompileConfig as HFCompileConfig

from .config import CompileConfig
from .filtering import VISION_TOWER, repeated_blocks
from .generation import SamplingParams, generate_text, stream
from .models import LoadedModel

WARMUP_PROMPT = "Describe the weather on a quiet autumn morning, in a few words."


class DecodeCache(StaticCache):
    """The static KV cache of the compiled decode step; it knows its own length, which
    transformers keeps only per layer (sliding layers hold just their window)."""

    def __init__(self, config, max_cache_len: int):
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.max_cache_len = max_cache_len


def compile_decode(loaded: LoadedModel, config: CompileConfig) -> list[str]:
    """Set up the compiled decode step (and the vision layers if asked); returns what was compiled."""
    model = loaded.model
    loaded.decode_cache = None
    model.generation_config.compile_config = None
    if config.mode == "none":
        return []
    # One query against the cache: PyTorch's CPU flash-attention kernel took ~1 ms a layer
    # (measured on the 270M, 40% of a step); plain matmul-softmax attention fuses into the
    # compiled graph instead. Prefill is eager and short, so it pays little for this.
    text_only = model.config.get_text_config() is model.config
    model.set_attn_implementation("eager" if text_only else {"text_config": "eager"})
    hf_config = HFCompileConfig(fullgraph=True, dynamic=None, backend=config.backend, mode=config.mode)
    hf_config._compile_all_devices = True  # transformers only auto-compiles on accelerators unless told
    model.generation_config.compile_config = hf_config
    loaded.decode_cache = DecodeCache(model.config, config.cache_len)
    compiled = ["decode step"]
    if config.vision:
        vision = {n: b for n, b in repeated_blocks(model, vision=True).items() if VISION_TOWER in n}
        for block in vision.values():
            block.compile(backend=config.backend, mode=None if config.mode == "default" else config.mode)
        compiled += list(vision)
    return compiled


def warm_up(loaded: LoadedModel) -> None:
    """Compile every decode graph now rather than in a request: a short prompt, one that
    fills the sliding window, and an image prompt when the model has a vision tower."""
    greedy = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eos=False)
    generate_text(loaded, WARMUP_PROMPT, params=greedy)
    window = loaded.model.config.get_text_config().sliding_window
    if window and window + 8 < loaded.decode_cache.max_cache_len:
        ids = torch.full((1, window - 2), loaded.tokenizer.pad_token_id or 0, dtype=torch.long)
        ids[0, 0] = loaded.tokenizer.bos_token_id
        for _ in stream(loaded, {"input_ids": ids.to(loaded.model.device)}, greedy):
            pass
    if loaded.has_vision:
        generate_text(loaded, WARMUP_PROMPT, Image.new("RGB", (64, 64), (128, 96, 64)), greedy)


def compile_counters() -> dict[str, int]:
    """dynamo's counts of compiled graphs, for checking that nothing recompiles."""
    from torch._dynamo.utils import counters

    return dict(counters["stats"])
