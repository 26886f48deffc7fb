"""The serving core behind ``predict.py``: the deployment's optimized model, plus
variants that a request asks for, each built once from the pristine weights, all run on
one thread of their own."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import queue
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener

from .config import N_M_METHODS, NEURON_METHODS, SEMI_STRUCTURED_MODES, SPARSITY_CHOICES, ConfigError, PipelineConfig
from .generation import GenerationStats, InputError, SamplingParams, build_inputs, stream
from .models import LoadedModel
from .cache import load_and_optimize
from .pipeline import Report, load, optimize, resolve_device
from .quantization import check_quantization

# Larger images are refused as decompression bombs. Phones' largest photos (200 MP, 16320 x 12240)
# pass; decoded, such an image takes up to 1 GB (RGBA) unless it is a JPEG (see open_image).
MAX_IMAGE_PIXELS = 250_000_000
register_heif_opener()  # iPhones' photos (HEIC), beside what Pillow reads itself (JPEG, PNG, WebP, AVIF, ...)


class ModelThread:
    """One long-lived thread that does all of a service's torch work, whichever thread asks.

    coglet runs setup on the main thread and each prediction on a new thread. Every thread
    that runs a parallel CPU kernel gets its own OpenMP thread pool, and once two pools
    exist libgomp counts more threads than cores and throttles its spin-waiting between
    kernels: the served 270M decoded at 56% of its speed in a plain process (34.8 vs 62.7
    tokens/s, ``python -m gemma_opt bench --served``). On CUDA, torch's CUDA-graph trees are
    per thread too, so a new thread would record its graphs again; and so are torch's config
    overrides, such as the inductor settings torchao's ``quantize_`` makes for the compile."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gemma-opt-model")

    def call(self, fn: Callable, /, *args, **kwargs):
        return self._executor.submit(fn, *args, **kwargs).result()

    def iterate(self, items: Callable[[], Generator]) -> Iterator:
        """Yield here what ``items()`` yields on the model thread. Closing this iterator, or an
        exception raised into the waiting thread (coglet's cancel), stops it after the next item."""
        out, stop = queue.SimpleQueue(), threading.Event()

        def produce():
            iterator = items()
            try:
                for item in iterator:
                    out.put(item)
                    if stop.is_set():
                        return
            finally:
                iterator.close()

        done = self._executor.submit(produce)
        done.add_done_callback(lambda _: out.put(done))
        try:
            while True:
                try:  # a timeout, so that a cancel raised into this thread is seen during prefill
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is done:
                    return done.result()  # re-raises what failed there
                yield item
        finally:
            stop.set()


class Service:
    """The deployment's optimized model, and variants built from one dense copy of the
    weights on the CPU (never touched), so a variant never prunes an already-pruned model.
    Loading, optimizing and generating all run on one ``ModelThread``."""

    def __init__(self, config: PipelineConfig, extra_variants: int = 1):
        self.config, self.extra_variants = config, extra_variants
        self.device = resolve_device(config.device)
        self.default_key = self._key(config)
        self.thread = ModelThread()
        self.variants: OrderedDict[tuple, tuple[LoadedModel, Report]] = OrderedDict()
        self.variants[self.default_key] = self.thread.call(load_and_optimize, config)
        self._pristine: torch.nn.Module | None = None

    @property
    def pristine(self) -> torch.nn.Module:
        """The dense weights on the CPU, loaded when a request first asks for another variant
        (a boot from the cold-boot cache never reads them otherwise); without a tokenizer, as
        every variant shares the default's."""
        if self._pristine is None:
            self._pristine = load(self.config.model_copy(update={"device": "cpu"}), preprocessing=False).model
        return self._pristine

    @property
    def default(self) -> tuple[LoadedModel, Report]:
        return self.variants[self.default_key]

    @property
    def image_size(self) -> int | None:
        """The side of the square the model sees an image at (every variant shares the
        processor); None for a text-only model, and where the processor's pan-and-scan crops
        the full-size image (each crop is then seen at that size)."""
        processor = self.default[0].processor
        if processor is None or processor.image_processor.do_pan_and_scan:
            return None
        size = processor.image_processor.size
        return max(size["height"], size["width"])

    def variant_config(self, sparsity: str, ratio: float | None, quantization: str) -> PipelineConfig:
        """``sparsity`` is one of SPARSITY_CHOICES; the deployment's N:M pattern, compaction and
        2:4 kernels are kept where they apply."""
        prune = {**SPARSITY_CHOICES[sparsity], "ratio": ratio if sparsity != "none" else None}
        if prune["method"] not in N_M_METHODS or prune["layer_ratios"] != "uniform":
            prune["pattern"] = "unstructured"
        prune["compact"] = self.config.prune.compact and prune["method"] in NEURON_METHODS
        semi_structured = (self.config.quant.semi_structured and prune.get("pattern", self.config.prune.pattern) == "2:4"
                           and quantization in SEMI_STRUCTURED_MODES)
        return self.config.replace(prune=prune, quant={"mode": quantization, "semi_structured": semi_structured})

    def prepare(self, prompt: str, image: Image.Image | None, system_prompt: str | None,
                max_new_tokens: int) -> dict:
        """The request's model inputs (``build_inputs``, on the model thread), or the InputError
        that says why it cannot be answered, before ``get`` spends minutes on the variant it asks
        for: every variant shares the default's processor, context length and device."""
        return self.thread.call(build_inputs, self.default[0], prompt, image, system_prompt, max_new_tokens)

    def get(self, sparsity: str, ratio: float | None, quantization: str) -> tuple[LoadedModel, Report]:
        """The variant for these choices: cached, or built (on the model thread) from the pristine weights."""
        try:
            config = self.variant_config(sparsity, ratio, quantization)
        except ConfigError as e:  # e.g. a method with sparsity_ratio 0, the web form's default
            raise InputError(f"sparsity_method {sparsity!r} with sparsity_ratio {ratio}: {e}") from None
        return self.thread.call(self._get, config)

    def generate(self, loaded: LoadedModel, inputs: dict, params: SamplingParams, stats: GenerationStats
                 ) -> Iterator[str]:
        """Stream the answer to ``prepare``'s inputs from a model of ``get``'s."""
        return self.thread.iterate(lambda: stream(loaded, inputs, params, stats))

    def _get(self, config: PipelineConfig) -> tuple[LoadedModel, Report]:
        key = self._key(config)
        if key in self.variants:
            if key != self.default_key:
                self.variants.move_to_end(key)
            return self.variants[key]
        check_quantization(config.quant, self.device, getattr(torch, config.dtype))  # before evicting what is cached
        extras = [k for k in self.variants if k != self.default_key]
        while extras and len(extras) >= self.extra_variants:
            del self.variants[extras.pop(0)]  # least recently used first
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        base = self.default[0]
        loaded = dataclasses.replace(base, model=copy.deepcopy(self.pristine).to(self.device))
        report = optimize(loaded, config)
        print(f"variant built for a request: {report.summary()}", file=sys.stderr, flush=True)
        self.variants[key] = (loaded, report)
        return self.variants[key]

    @staticmethod
    def _key(config: PipelineConfig) -> tuple:
        return (config.prune.choice, config.prune.ratio, config.prune.pattern, config.prune.compact, config.quant.mode,
                config.quant.semi_structured)


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """An RGB image, or an InputError that says what is wrong with the file.

    With ``size``, the side of the square the model sees images at, a JPEG is decoded at the
    smallest scale (1/2, 1/4 or 1/8, the DCT's own downscale: Pillow's ``draft``) that keeps
    both sides at least ``size``: a phone's 12 MP photo is then read and resized to Gemma's
    896 x 896 in 140 ms instead of 300, a 48 MP one in 300 instead of 1170 (2 cores,
    ``scripts/image_read_speed.py``)."""
    if os.path.getsize(path) == 0:
        raise InputError("image: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(path) as image:
                if size:
                    image.draft(None, (size, size))  # JPEG; HEIC: an embedded thumbnail that large, if any
                image.load()
                return _upright_on_white(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image: too large to decode safely (limit {MAX_IMAGE_PIXELS:,} pixels): {e}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image: not a readable image file ({type(e).__name__}: {e})") from None


def _upright_on_white(image: Image.Image) -> Image.Image:
    """The image in 8-bit RGB as a viewer shows it. A plain ``convert("RGB")`` gets three kinds
    of file wrong: a phone's portrait (landscape pixels plus an EXIF orientation tag) lies on
    its side; transparent pixels keep the colour under them, often black, so a black logo on a
    transparent background became all black (transformers' ``convert_to_rgb`` composites over
    white too); and 16-bit grey (scans, X-rays) is clipped at 255, nearly all white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
