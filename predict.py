"""Cog entry point: thin I/O around ``gemma_opt.service``."""

import os
from typing import Optional

import cog
from cog import BaseRunner, ConcatenateIterator, Input, Path

from gemma_opt.config import QUANT_MODES, SPARSITY_CHOICES, PipelineConfig
from gemma_opt.generation import GenerationStats, SamplingParams
from gemma_opt.models import GENERATION_DEFAULTS
from gemma_opt.service import Service, open_image

DEPLOYED = PipelineConfig.load()  # GEMMA_OPT_* from cog.yaml: the web form's defaults


class Predictor(BaseRunner):
    def setup(self, weights: Optional[Path] = None) -> None:
        """Load Gemma 3 and run the whole pipeline once."""
        config = DEPLOYED.replace(model=str(weights)) if weights else DEPLOYED
        self.service = Service(config)
        print(self.service.default[1].summary(), flush=True)  # see README: coglet and the last setup line

    @cog.streaming
    def run(
        self,
        prompt: str = Input(description="What to ask about the image, or a plain text prompt "
                                      "(it may be empty only with an image)."),
        image: Optional[Path] = Input(default=None, description="Optional image: upload, URL or data URI."),
        system_prompt: str = Input(default="", description="Instructions placed before the prompt "
                                   "(Gemma 3 has no system role: it is merged into the first user turn)."),
        max_new_tokens: int = Input(default=512, ge=1, le=8192, description="Most tokens to generate."),
        temperature: float = Input(default=GENERATION_DEFAULTS["temperature"], ge=0.0, le=2.0,
                                   description="Sampling temperature; 0 is greedy decoding."),
        top_p: float = Input(default=GENERATION_DEFAULTS["top_p"], ge=0.01, le=1.0,
                             description="Nucleus sampling: keep the smallest set of tokens with this probability."),
        top_k: int = Input(default=GENERATION_DEFAULTS["top_k"], ge=0, le=1000,
                           description="Sample from the k most likely tokens; 0 disables the limit."),
        seed: Optional[int] = Input(default=None, ge=0, le=2**31 - 1,
                                    description="Random seed; leave empty for a random one (it is logged)."),
        sparsity_method: str = Input(default=DEPLOYED.prune.choice, choices=list(SPARSITY_CHOICES),
                                     description="Pruning method ('owl-' = outlier-aware layer ratios; wanda "
                                     "keeps quality best). Anything but the default builds (once) a variant "
                                     "from the pristine weights, which takes a while."),
        sparsity_ratio: float = Input(default=DEPLOYED.prune.ratio or 0.0, ge=0.0, le=0.8,
                                      description="Fraction of weights zeroed (0.01-0.8; ignored for 'none')."),
        quantization: str = Input(default=DEPLOYED.quant.mode, choices=list(QUANT_MODES),
                                  description="Weight-only quantization of the decoder linears."),
    ) -> ConcatenateIterator[str]:
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        print(f"seed: {seed}")
        picture = open_image(image, self.service.image_size) if image else None
        inputs = self.service.prepare(prompt, picture, system_prompt, max_new_tokens)  # fails before a variant build
        loaded, report = self.service.get(sparsity_method, sparsity_ratio, quantization)
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed)
        stats = GenerationStats()
        yield from self.service.generate(loaded, inputs, params, stats)
        self.record_metric("input_token_count", stats.input_tokens)
        self.record_metric("output_token_count", stats.output_tokens)
        self.record_metric("time_to_first_token", stats.ttft_s)
        self.record_metric("tokens_per_second", stats.decode_tokens_per_s)
        self.record_metric("sparsity", report.prune.overall)
        self.record_metric("seed", seed)
