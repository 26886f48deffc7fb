"""Streaming generation for image + prompt, with the numbers a service reports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria, TextIteratorStreamer

from .models import GENERATION_DEFAULTS, LoadedModel


class InputError(ValueError):
    """A request this model cannot serve; the message is for the user."""


class CompileFriendlyCache(DynamicCache):
    """A DynamicCache whose ``update`` runs eagerly.

    Inside a compiled decoder layer, dynamo would guard on each layer's cache entry
    (``layers[i].is_initialized``) and compile one graph per layer; keeping the update
    out of the graph lets every layer share one compiled graph.
    """

    update = torch.compiler.disable(DynamicCache.update)


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = GENERATION_DEFAULTS["temperature"]
    top_p: float = GENERATION_DEFAULTS["top_p"]
    top_k: int = GENERATION_DEFAULTS["top_k"]
    seed: int = 0
    stop_at_eos: bool = True  # benchmarks decode a fixed number of tokens


@dataclass
class GenerationStats:
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0


def build_inputs(loaded: LoadedModel, prompt: str, image=None, system_prompt: str | None = None,
                 max_new_tokens: int = 0) -> dict:
    """Chat-formatted model inputs. Gemma 3 has no system role: its template merges the
    system prompt into the first user turn, and so does ours."""
    if image is not None and not loaded.has_vision:
        raise InputError(f"this model ({loaded.name}) has no vision tower; send the prompt without an image")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
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
    device = next(loaded.model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


class _TimedStreamer(TextIteratorStreamer):
    """Records when each generated token arrives."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.token_times: list[float] = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.token_times.extend([time.perf_counter()] * value.numel())
        super().put(value)


class _StopOn(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream(loaded: LoadedModel, inputs: dict, params: SamplingParams, stats: GenerationStats | None = None,
           cache: bool = True) -> Iterator[str]:
    """Yield text as it is generated. Closing the iterator (or an exception in the consumer)
    stops generation at the next token. ``cache=False`` uses transformers' default cache
    (the plain-``generate()`` baseline)."""
    stats = stats if stats is not None else GenerationStats()
    streamer = _TimedStreamer(loaded.tokenizer)
    stop = threading.Event()
    failure: list[BaseException] = []
    greedy = params.temperature == 0
    kwargs = dict(inputs, max_new_tokens=params.max_new_tokens, do_sample=not greedy, streamer=streamer,
                  stopping_criteria=[_StopOn(stop)], eos_token_id=loaded.eos_token_ids,
                  pad_token_id=loaded.tokenizer.pad_token_id)
    if not params.stop_at_eos:
        kwargs["min_new_tokens"] = params.max_new_tokens
    if not greedy:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if cache:
        kwargs["past_key_values"] = CompileFriendlyCache(config=loaded.model.config)

    def run():
        try:
            torch.manual_seed(params.seed)
            with torch.inference_mode():
                loaded.model.generate(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer below
            failure.append(e)
            streamer.end()

    start = time.perf_counter()
    stats.input_tokens = int(inputs["input_ids"].shape[1])
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from (text for text in streamer if text)
    finally:
        stop.set()
        thread.join()
        times = streamer.token_times
        stats.output_tokens = len(times)
        if times:
            stats.ttft_s = times[0] - start
            stats.decode_tokens_per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    if failure:
        raise failure[0]


def generate_text(loaded: LoadedModel, prompt: str, image=None, params: SamplingParams | None = None,
                  system_prompt: str | None = None, stats: GenerationStats | None = None) -> str:
    params = params or SamplingParams()
    inputs = build_inputs(loaded, prompt, image, system_prompt, params.max_new_tokens)
    return "".join(stream(loaded, inputs, params, stats))
