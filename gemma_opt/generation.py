"""Streaming generation for image + prompt, with the numbers a service reports."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers.decoders import DecodeStream
from torch.nn import functional as F
from transformers import DynamicCache, StaticCache

from .models import GENERATION_DEFAULTS, LoadedModel


class InputError(ValueError):
    """A request this model cannot serve; the message is for the user."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = GENERATION_DEFAULTS["temperature"]
    top_p: float = GENERATION_DEFAULTS["top_p"]
    top_k: int = GENERATION_DEFAULTS["top_k"]
    seed: int = 0
    stop_at_eos: bool = True  # benchmarks decode a fixed number of tokens

    def __post_init__(self):
        # JSON clients send whole numbers ("temperature": 1), and transformers' warpers refuse ints
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)


@dataclass
class GenerationStats:
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    def record(self, start: float, token_times: list[float]) -> None:
        """The figures from when the request started and when each generated token arrived."""
        self.output_tokens = len(token_times)
        if token_times:
            self.ttft_s = token_times[0] - start
            if len(token_times) > 1:
                self.decode_tokens_per_s = (len(token_times) - 1) / (token_times[-1] - token_times[0])


def check_request(loaded: LoadedModel, prompt: str, image=None, system_prompt: str | None = None) -> None:
    """What makes a request unanswerable, found before tokenizing it."""
    if not prompt.strip() and image is None:  # nothing asked: the model would ramble for max_new_tokens
        raise InputError("the prompt is empty; write one, or send an image (with an image, it may be empty)")
    if image is not None and not loaded.has_vision:
        raise InputError(f"this model ({loaded.name}) has no vision tower; send the prompt without an image")
    if loaded.processor is not None:  # it expands these itself; typed in, they broke its count of images
        for marker in (loaded.processor.boi_token, loaded.processor.tokenizer.image_token):
            if marker in prompt or marker in (system_prompt or ""):
                raise InputError(f"the prompt contains {marker}, Gemma's marker for where an image goes; "
                                 "send the picture as the `image` input and leave the marker out")


def build_inputs(loaded: LoadedModel, prompt: str, image=None, system_prompt: str | None = None,
                 max_new_tokens: int = 0) -> dict:
    """Chat-formatted model inputs. Gemma 3 has no system role: its template merges the
    system prompt into the first user turn, and so does ours."""
    check_request(loaded, prompt, image, system_prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    messages.append({"role": "user", "content": ([{"type": "image"}] if image is not None else [])
                     + [{"type": "text", "text": prompt}]})
    if loaded.processor is not None:
        text = loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = loaded.processor(text=text, images=[image] if image is not None else None,
                                  add_special_tokens=False, return_tensors="pt")
    else:
        inputs = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
    limit = loaded.model.config.get_text_config().max_position_embeddings
    used = inputs["input_ids"].shape[1] + max_new_tokens
    if used > limit:
        raise InputError(f"prompt ({inputs['input_ids'].shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceeds this model's context of {limit} tokens")
    return {k: v.to(loaded.model.device) for k, v in inputs.items()}


def next_token_logits(model, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position's logits and their argmax, greedy decoding's next token. The
    compiled decode step (compilation.py) is this function, so the argmax is in its graph:
    ATen's own argmax over Gemma's 262k-entry vocabulary in bf16 took ~1 ms a token on this CPU."""
    logits = model(**inputs).logits[:, -1]
    return logits, (blockwise_argmax(logits) if logits.is_cuda else logits.argmax(-1))


def blockwise_argmax(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``logits.argmax(-1)`` in two reductions: each block's largest, then the largest block's.
    inductor never splits an argmax, so on a GPU it reduced Gemma's 262k logits in one program:
    37 us of a 2.83 ms step on the H200 (run 5). On this CPU one pass is faster (154 against
    174 us, each compiled alone). The first of equal largest wins, as with ``argmax``."""
    padded = F.pad(logits, (0, -logits.shape[-1] % block), value=float("-inf"))
    largest, where = padded.unflatten(-1, (-1, block)).max(-1)
    chosen = largest.argmax(-1, keepdim=True)
    return (chosen * block + where.gather(-1, chosen)).squeeze(-1)


def stream(loaded: LoadedModel, inputs: dict, params: SamplingParams, stats: GenerationStats | None = None
           ) -> Iterator[str]:
    """Yield text as it is generated, in the caller's thread; closing the iterator stops it.

    gpt-fast style: one eager prefill, then one token per step through the compiled decode
    step on the model's static cache, with masks over just its first positions (see
    compilation.py). A request that fills the static cache goes on eagerly on a dynamic copy
    of it, so a generous ``max_new_tokens`` costs nothing until the cache is full; a prompt
    that does not fit, or a model with nothing compiled, decodes eagerly from the start
    (transformers' dynamic cache). A loop of our own rather than ``generate()``
    in a helper thread, because with two cores OpenMP throttles its spinning as soon as a
    second thread owns a thread pool: every kernel then waits on a futex wake-up (measured:
    decode 25% slower on the 270M). Sampling: see ``_sampler``.
    """
    stats = stats if stats is not None else GenerationStats()
    model, prompt_len = loaded.model, int(inputs["input_ids"].shape[1])
    stats.input_tokens = prompt_len
    eager, no_masks = functools.partial(next_token_logits, model), lambda position: None
    cache, full_at = loaded.decode_cache, None
    if cache is not None and prompt_len < cache.max_cache_len:
        forward, decode_masks, full_at = loaded.decode_step, cache.decode_masks, cache.max_cache_len
    else:
        cache, forward, decode_masks = DynamicCache(config=model.config), eager, no_masks
    # On a GPU the next step is queued before this token is read, so the host's work for a
    # token (dynamo's guards, launching the step or replaying its CUDA graph, detokenizing)
    # runs while the GPU computes instead of between steps; on a CPU that work is the same
    # thread's, and queuing first would only add a step after the last token.
    ahead = model.device.type == "cuda"
    pick = _sampler(params)
    eos = set(loaded.eos_token_ids) if params.stop_at_eos else set()
    # each token's text once it is complete (a token may end inside a UTF-8 character; an
    # answer cut there by max_new_tokens ends before it), at a constant cost a token:
    # decoding the line so far at each token, as transformers' TextStreamer does, took
    # 0.9 ms a token 2,000 tokens into a line (2 µs this way)
    text, backend = DecodeStream(skip_special_tokens=True), loaded.tokenizer.backend_tokenizer
    start, times = time.perf_counter(), []
    torch.manual_seed(params.seed)
    with torch.inference_mode():
        if isinstance(cache, StaticCache):
            cache.reset()  # in inference mode: its tensors were created there
        positions = torch.arange(prompt_len, device=model.device)
        logits, greedy = next_token_logits(model, **inputs, past_key_values=cache, cache_position=positions,
                                           use_cache=True, logits_to_keep=1)

        def decode(token, step):
            nonlocal cache, forward, decode_masks
            if prompt_len + step == full_at:  # the static cache is full
                cache, forward, decode_masks = cache.dynamic_copy(full_at, model.config), eager, no_masks
            position = positions[-1:] + (step + 1)  # one add: on a GPU, each is a kernel launch
            return forward(input_ids=token.view(1, 1), past_key_values=cache, cache_position=position,
                           attention_mask=decode_masks(prompt_len + step), use_cache=True)

        try:
            for step in range(params.max_new_tokens):
                token = pick(logits, greedy)
                read = _read_later(token) if ahead else token.item
                more = step + 1 < params.max_new_tokens
                if ahead and more:
                    logits, greedy = decode(token, step)
                token_id = read()
                times.append(time.perf_counter())
                if token_id in eos:
                    break
                if piece := text.step(backend, token_id):
                    yield piece
                if more and not ahead:
                    logits, greedy = decode(token, step)
        finally:
            stats.record(start, times)


def _read_later(token: torch.Tensor) -> Callable[[], int]:
    """What returns ``int(token)`` for a token on a GPU: the copy to the host is queued now and
    then only it is waited for; ``int(token)`` would also wait for whatever was queued after it."""
    on_host, copied = token.to("cpu", non_blocking=True), torch.cuda.Event()  # into pinned memory
    copied.record()

    def read() -> int:
        copied.synchronize()
        return int(on_host)
    return read


def _sampler(params: SamplingParams):
    """next token from last-position logits and their argmax: the argmax, or a draw from
    ``candidates``."""
    if params.temperature == 0:  # a copy: with CUDA graphs, the step's outputs are overwritten by its next run
        return lambda logits, greedy: greedy.clone()

    def sample(logits, greedy):
        probs, ids = candidates(logits, params)
        # torch.multinomial's race for one sample, argmax(p / q) with q exponential, without its
        # input checks, which wait for a GPU (.item()) and would stop the next step from being
        # queued before this token is read (see stream). q = -log(u), u uniform, so the race is
        # argmax(log(u) / p): ATen's exponential_ took 5.2 ms for 262k numbers on this CPU, this
        # 1.1 ms. No NaN: log(u) < 0 (u < 1), and a token with p = 0 gets -inf.
        choice = (torch.rand_like(probs).log_() / probs).argmax(-1, keepdim=True)
        return (choice if ids is None else ids.gather(-1, choice))[:, 0]
    return sample


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What transformers' temperature, top-k and top-p warpers leave of the vocabulary: the
    tokens that can be drawn, most likely first, with their ids (None: the whole vocabulary),
    and weights in proportion to their probabilities. Their top-k also keeps logits tied with
    the k-th; here exactly k are kept.

    Without sorting Gemma's 262k logits, which with drawing over all of them took 18-21 ms a
    token on 2 CPU cores, as long as the 270M's whole decode step. With a top-k, only those k
    are warped (1.2 ms; ``bench --sample``: 26.8 tokens/s before, 49.8 after, as greedy).
    Without one, the nucleus lies within the first count of most likely tokens (64, 512, 4096,
    ...) whose probability reaches ``top_p``. Checking that reads a value, which on a GPU would
    make the host wait (see ``stream``): there the whole vocabulary is sorted, fast."""
    scores, ids = logits.float() / params.temperature, None
    if params.top_k > 0:
        scores, ids = scores.topk(min(params.top_k, scores.shape[-1]))
    probs = scores.softmax(-1)
    if params.top_p < 1:
        if ids is None:
            probs, ids = _most_likely_holding(probs, params.top_p)
        # a token is kept while the tokens more likely than it hold less than top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p, 0)
    return probs, ids


def _most_likely_holding(probs: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first count of most likely tokens (64, 512, 4096, ...; on a GPU all of them, see
    ``candidates``) whose probability reaches ``share``, most likely first, with their ids."""
    vocab = probs.shape[-1]
    count = vocab if probs.is_cuda else 64
    while True:
        top, ids = probs.topk(count)
        if count == vocab or top.sum() >= share:
            return top, ids
        count = min(8 * count, vocab)


def generate_text(loaded: LoadedModel, prompt: str, image=None, params: SamplingParams | None = None,
                  system_prompt: str | None = None, stats: GenerationStats | None = None) -> str:
    params = params or SamplingParams()
    inputs = build_inputs(loaded, prompt, image, system_prompt, params.max_new_tokens)
    return "".join(stream(loaded, inputs, params, stats))
