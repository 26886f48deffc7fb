"""Selective ``torch.compile``: the per-token decode step, where serving time goes.

Prefill runs once per request and stays eager; every generated token runs the
language model's decode step, and that is what gets compiled: one token at a time
against a static KV cache of ``cache_len`` positions, so the step has the same shapes
in every request whatever its prompt length or ``max_new_tokens``, and one set of
graphs serves them all (transformers' ``generate()`` compiles the same step when the cache
is static, on accelerators).

Every layer's cache holds all ``cache_len`` positions, the sliding-window layers too,
and the window is applied by the attention mask, as gpt-fast does. transformers' own
sliding layers keep just the window and count their length in a Python int: dynamo
specialises on it (three graphs: first step, symbolic int, window full) and CUDA graphs
record a new graph for every value of it. Full-length layers make the step one graph
with the same shapes and no Python state, for any prompt length and ``max_new_tokens``.
So that a short request does not read the whole cache, the decode loop passes masks over
the first positions only, rounded up to ``kv_bucket``, with that length marked dynamic:
still one graph (measured on the 270M: a step reading 256 positions instead of 2048 is
17% faster). On a GPU the step keeps one static shape and reads the whole cache: CUDA
graphs need it, and in plain compile mode inductor specialised the dynamic length on the
one GPU tried (H200, torch 2.11: a ConstraintViolationError in the warm-up). The vision
encoder's layers, run once per image, can be compiled regionally (``vision``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from PIL import Image
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .config import CompileConfig
from .filtering import VISION_TOWER, repeated_blocks
from .generation import SamplingParams, generate_text, next_token_logits
from .int8_gemv import device_ops, fuse_projections, supported, use_int8_gemv
from .models import LoadedModel

ATTENTION = "gemma_opt_grouped"
DECODE_ATTENTION = "gemma_opt_decode"  # the same, a decoded token's on our kernel (CPU or CUDA)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
WARMUP_PROMPT = "Describe the weather on a quiet autumn morning, in a few words."
# Each model's decode step keeps its own compiled graphs (see compile_decode). torch before
# 2.13 may lack the option (the GPU machines lent here run 2.11): there they share one cache.
OWN_GRAPHS = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def step_compile_options(mode: str) -> dict:
    """torch.compile's arguments for a model's decode step, beyond the function and backend.

    With its own graphs, a step only ever runs its own model, and the model is not changed
    once its step is compiled (a variant is a new model): dynamo's guards on the modules'
    attributes and parameters (4,775 of the 270M step's 5,161) then only cost time, 1.3 ms of a 16 ms
    step, so they are dropped. torch takes either ``mode`` or ``options``: the mode is passed
    as the options it stands for. Where models share one cache (no ``isolate_recompiles``),
    those guards are what tells their graphs apart, and they stay."""
    if not OWN_GRAPHS:
        return {"mode": mode}
    return {"isolate_recompiles": True, "options": {**torch._inductor.list_mode_options(mode),
                                                    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}


class WholeRowReductions(InductorChoices):
    """inductor's heuristics, except that a row of up to 4096 values is reduced in one pass of
    loads held in registers (a persistent reduction) rather than in a loop. On a GPU the 4B's
    decode step has two RMS-norm kernels a layer over its 2560 hidden values, each with a
    residual add and a second norm: as loops, three passes over the row that each wait on
    their loads, 3.1-3.4 us a kernel, 0.22 ms of a 2.83 ms step on the H200 (run 5). inductor
    keeps the one-pass form to rows of 1024; a decoded token's rows are few and short."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        whole_row = (features.get_reduction_hint() == ReductionHint.INNER
                     and V.graph.sizevars.statically_known_leq(features.reduction_numel, 4096))
        return whole_row or InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def with_choices(step, choices: InductorChoices):
    """``step``, a compiled function, with ``choices`` as inductor's heuristics when it compiles
    (on a call: the first, in the warm-up)."""
    @functools.wraps(step)
    def run(*args, **kwargs):
        with V.set_choices_handler(choices):
            return step(*args, **kwargs)
    return run


class DecodeCache(StaticCache):
    """The static KV cache of the compiled decode step: ``max_cache_len`` positions in every
    layer (no sliding layers, see above)."""

    def __init__(self, config, max_cache_len: int, kv_bucket: int | None, dtype: torch.dtype, device):
        text = config.get_text_config(decoder=True)
        Cache.__init__(self, layers=[StaticLayer(max_cache_len=max_cache_len) for _ in range(text.num_hidden_layers)])
        self.max_cache_len, self.kv_bucket = max_cache_len, kv_bucket
        # Every mask this cache will need, as windows onto one row per layer type: entry j is
        # for a cached position j - max_cache_len - 1 ahead of the token (negative: behind it).
        # The first two entries are never in a window: dynamo specialises a dynamic tensor's
        # storage offset of 0 or 1 (a second graph when the cache's last position is reached).
        ahead = torch.arange(2 * max_cache_len + 1, device=device) - (max_cache_len + 1)
        keep = {"full_attention": ahead <= 0, "sliding_attention": (ahead <= 0) & (ahead > -text.sliding_window)}
        self.mask_rows = {kind: torch.where(k, 0.0, torch.finfo(dtype).min).to(dtype).view(1, 1, 1, -1)
                          for kind, k in keep.items()}

    def decode_masks(self, position: int) -> dict[str, torch.Tensor]:
        """Additive masks for the token at ``position`` by layer type, as Gemma 3's forward
        takes them: over the whole cache, or with ``kv_bucket`` over its first positions (a
        multiple of it, dynamic for the compiler). Views, built with no work per token, and
        inputs of the step: built in its graph, as transformers builds them, a mask is built
        again for each layer (inductor copies an unrealized input of an extern kernel into
        each call; 34 kernels a step on the 4B on the H200)."""
        length = self.max_cache_len
        if self.kv_bucket is not None:
            length = min(length, -(-(position + 1) // self.kv_bucket) * self.kv_bucket)
        start = self.max_cache_len + 1 - position
        masks = {kind: row[..., start:start + length] for kind, row in self.mask_rows.items()}
        if self.kv_bucket is not None:
            for mask in masks.values():
                torch._dynamo.mark_dynamic(mask, 3)
        return masks

    def dynamic_copy(self, length: int, config) -> DynamicCache:
        """The first ``length`` positions in transformers' dynamic cache for the model's
        ``config`` (sliding layers keep their window), for a request that outgrows this one to
        go on eagerly."""
        dynamic = DynamicCache(config=config)
        for index, layer in enumerate(self.layers):
            dynamic.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)
        return dynamic


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """transformers' eager attention, without copying K and V once per query head; a
    prompt's (many query positions) on PyTorch's fused attention.

    The eager version expands K/V to every query head (``repeat_kv``): for one decoded
    token that copy is most of the attention's memory traffic (Gemma 3 270M: 4 query heads
    per KV head). Here the query heads of a group are stacked against their shared KV head.
    A prompt goes to transformers' SDPA attention instead (flash attention on CPU and CUDA):
    matmul-softmax materialises every head's prompt x cache scores, and made a 2,000-token
    prefill on the 270M 2.2x slower than transformers' own (5.2 against 2.4 s).
    """
    batch, heads, q_len, dim = query.shape
    groups = key.shape[1]
    if attention_mask is not None:  # a decode mask may cover only the cache's first positions
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    if q_len > 1 and softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q = query.reshape(batch, groups, heads // groups * q_len, dim)
    # K @ qᵀ, not q @ Kᵀ: with one KV head inductor hands bmm a transposed K whose batch
    # stride CPU bmm does not accept, and it copied the whole K cache every layer (measured on
    # the 270M: 0.36 ms a layer, 15% of a decode step); K as stored needs no copy.
    scores = (key @ q.transpose(-1, -2)).transpose(-1, -2)
    scores = scores.reshape(batch, groups, heads // groups, q_len, -1) * (scaling or dim**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    out = probs.view(batch, groups, heads // groups * q_len, -1) @ value
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """``grouped_attention``, with a decoded token's (one query position) on our kernel. On
    CPU (decode_attention.cpp): K and V read once, in fp32, on both cores even with one KV
    head; ATen's two bmm calls a layer took ~100 us each on the 270M's 256-position bucket
    (12% of a decode step), ours is 2.1-3.8x faster a layer (scripts/decode_attention_bench.py).
    On CUDA (decode_attention_cuda.py, Triton): the positions the mask blocks are not read,
    so the whole-cache shape that CUDA graphs need costs no reads (not yet timed on a GPU)."""
    if (query.shape[2] != 1 or softcap is not None or query.shape[-1] % 32
            or (attention_mask is not None and attention_mask.dtype != query.dtype)):
        return grouped_attention(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
    scale = scaling or query.shape[-1] ** -0.5
    op = torch.ops.gemma_opt.decode_attention_cuda if query.is_cuda else torch.ops.gemma_opt.decode_attention
    return op(query, key, value, attention_mask, scale), None


for name, function in ((ATTENTION, grouped_attention), (DECODE_ATTENTION, decode_attention)):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def compile_decode(loaded: LoadedModel, config: CompileConfig) -> list[str]:
    """Set up the compiled decode step (and the vision layers if asked); returns what was compiled."""
    model = loaded.model
    loaded.decode_cache = loaded.decode_step = None
    if config.mode == "none":
        return []
    # One query against the cache: PyTorch's CPU flash-attention kernel took ~1 ms a layer
    # (measured on the 270M, 40% of a step); plain matmul-softmax attention fuses into the
    # compiled graph instead, and a decoded token's runs on our kernel (CPUs with AVX-512 or AVX2,
    # CUDA with Triton). A prompt's stays on PyTorch's fused attention (grouped_attention).
    on_cpu = model.device.type == "cpu"
    attention = ATTENTION
    if config.decode_attention and supported(model.device):
        device_ops(model.device.type)  # built and registered now, not while the step is traced
        attention = DECODE_ATTENTION
    text_only = model.config.get_text_config() is model.config
    model.set_attn_implementation(attention if text_only else {"text_config": attention})
    # dynamo keeps compiled graphs per code object, and every model's forward is the same code:
    # shared, the service's variants (a new graph for each weight format and each compacted
    # width) would exhaust dynamo's limit of 8 graphs, after which a new variant's compile
    # fails (fullgraph). With its own graphs, a model compiles its step once and keeps it.
    loaded.decode_step = torch.compile(functools.partial(next_token_logits, model), fullgraph=True, backend=config.backend,
                                       **step_compile_options(config.mode))
    if model.device.type == "cuda":
        loaded.decode_step = with_choices(loaded.decode_step, WholeRowReductions())
    kv_bucket = config.kv_bucket if on_cpu and config.mode not in CUDA_GRAPH_MODES else None
    loaded.decode_cache = DecodeCache(model.config, config.cache_len, kv_bucket, model.dtype, model.device)
    compiled = ["decode step"]
    if attention == DECODE_ATTENTION:
        compiled.append(f"decode-attention kernel ({model.device.type})")
    if config.int8_gemv and (swapped := use_int8_gemv(model)):  # CPUs with AVX-512 or AVX2, CUDA with Triton
        compiled.append(f"INT8 GEMV kernel ({swapped} linears)")
        if config.fuse_projections and (fused := fuse_projections(model)):
            compiled.append(f"fused q/k/v and gate/up projections ({fused} modules)")
    if config.vision:
        vision = {n: b for n, b in repeated_blocks(model, vision=True).items() if VISION_TOWER in n}
        for block in vision.values():
            block.compile(backend=config.backend, mode=None if config.mode == "default" else config.mode)
        compiled += list(vision)
    return compiled


def warm_up(loaded: LoadedModel, vision_compiled: bool) -> None:
    """Compile the decode step now rather than in a request (the first two steps: CUDA graphs
    record on the second call); an image prompt too where the vision layers are compiled, or
    on a GPU, where one pass takes a moment (kept there as it was; not measured). On a CPU
    nothing else compiles for an image (tested), and the image would cost every boot a pass
    through the 4B's tower (7-31 s) to spare the first image request ~0.3 s."""
    greedy = SamplingParams(max_new_tokens=4, temperature=0, stop_at_eos=False)
    generate_text(loaded, WARMUP_PROMPT, params=greedy)
    if loaded.has_vision and (vision_compiled or loaded.model.device.type != "cpu"):
        generate_text(loaded, WARMUP_PROMPT, Image.new("RGB", (64, 64), (128, 96, 64)), greedy)


def compile_counters() -> dict[str, int]:
    """dynamo's counts of compiled graphs, for checking that nothing recompiles."""
    from torch._dynamo.utils import counters

    return dict(counters["stats"])


def compile_cache_counts() -> dict[str, int]:
    """How many graphs this process took from torch's compile caches (hits) and compiled
    itself (misses): AOTAutograd's, whose key hashes the graph's inputs, torchao's Int8Tensor
    weights included, and inductor's. A boot from the cold-boot cache should compile none."""
    from torch._dynamo.utils import counters

    return {"aot_autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
            "inductor_hits": counters["inductor"]["fxgraph_cache_hit"],
            "inductor_misses": counters["inductor"]["fxgraph_cache_miss"]}
