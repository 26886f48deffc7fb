"""Cold boot: the compressed model and its compile artifacts, saved once, loaded at every boot.

Without this, every ``setup()`` loads the dense weights and redoes pruning, quantization and
compilation. After the pipeline has run once, ``<cache_dir>/<key>/`` holds:

- ``model.pt``: the pruned, quantized (and compacted) model's state dict, written by
  ``torch.save`` (torchao's tensor subclasses serialize) with its config; the next boot
  builds the architecture on the meta device, narrows the compacted MLPs, and assigns the
  tensors, memory-mapped (torchao's documented way to load quantized weights);
- ``tokenizer/``: the tokenizer (and image processor), ``save_pretrained``;
- ``compile.bin``: PyTorch's portable compile cache (``torch.compiler.save_cache_artifacts``),
  loaded before the warm-up so inductor finds every graph already compiled;
- ``inductor/``: inductor's local cache for this entry (on a CPU, the built C++ kernels);
- ``manifest.json``, written last: what the key was made of, the report, and the size and
  SHA-256 of each file.

The key hashes the model's revision, the whole pipeline config, the gemma_opt source, the
torch/torchao/transformers versions and the device: change any of them and the boot builds
a new entry instead of using a stale one. A manifest that does not match its files (a
truncated copy, a flipped byte) is reported and the entry rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torchao.quantization import Int8Tensor

from .config import ConfigError, PipelineConfig
from .models import LoadedModel, load_preprocessing, model_revision
from .pipeline import Report, accelerate, compress, load, resolve_device
from .pruning import PruneReport
from .quantization import SharedInt8Embedding

MODEL_FILE, TOKENIZER_DIR, COMPILE_FILE, MANIFEST = "model.pt", "tokenizer", "compile.bin", "manifest.json"
INDUCTOR_DIR = "inductor"  # inductor's local cache; not in the manifest (inductor keys and checks its own files)
_SOURCE = Path(__file__).parent


class CacheMiss(Exception):
    """Why a cache entry cannot be used (absent, incomplete, corrupt)."""


def cache_inputs(config: PipelineConfig, device: str) -> dict:
    """Everything the compressed model and its kernels depend on."""
    source = hashlib.sha256()
    for path in sorted(p for p in _SOURCE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        source.update(path.relative_to(_SOURCE).as_posix().encode() + b"\0" + path.read_bytes())
    if device.startswith("cuda"):
        target = f"{torch.cuda.get_device_name(device)} sm{torch.cuda.get_device_capability(device)} cuda {torch.version.cuda}"
    else:
        target = f"{_cpu_model()} x{torch.get_num_threads()} {torch.backends.cpu.get_cpu_capability()}"
    revision = model_revision(config.model) or model_revision(config.fallback_model or config.model)
    return {"model": revision, "pipeline": config.model_dump(mode="json", exclude={"cache_dir"}),
            "gemma_opt_source": source.hexdigest(), "device": target,
            "versions": {pkg: version(pkg) for pkg in ("torch", "torchao", "transformers")}}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def entry_folder(config: PipelineConfig, inputs: dict) -> Path:
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return Path(config.cache_dir) / key


def load_and_optimize(config: PipelineConfig, *, must_save: bool = False) -> tuple[LoadedModel, Report]:
    """The deployment's model, optimized: from the cache when ``config.cache_dir`` holds a
    valid entry, else loaded, run through the pipeline and (with a ``cache_dir``) saved.
    ``report.cache`` says which: 'off', 'hit' or 'miss: <reason>', plus '; not saved: <why>'
    when the disk refused the entry (full, read-only): the model still serves, and the next
    boot builds again. With ``must_save`` (``prebuild``, whose whole job is the entry) that
    is a ``ConfigError`` instead."""
    if config.cache_dir is None:
        return _build(config, None, None)
    device = resolve_device(config.device)
    inputs = cache_inputs(config, device)
    folder = entry_folder(config, inputs)
    # Inductor's own cache lives in the entry too: the portable artifacts hold the generated
    # code, but on a CPU its C++ kernels would be compiled again on every fresh machine.
    # The key names the exact CPU or GPU, so these binaries only meet the hardware they
    # were built for.
    try:
        with temporary_cache_dir(str(folder / INDUCTOR_DIR)):
            loaded, report = _load_entry(folder, inputs, device)
            return loaded, accelerate(loaded, config, report)
    except CacheMiss as e:
        miss = str(e)
    print(f"cold-boot cache {folder}: {miss}; building it", file=sys.stderr)
    saver = _EntrySaver(folder, must_save)
    saver.run(_empty_folder, folder)  # before the model loads: a cache_dir that cannot be written is known at once
    with temporary_cache_dir(str(folder / INDUCTOR_DIR)) if saver.ok else contextlib.nullcontext():
        loaded, report = _build(config, saver, inputs)
    report.cache = f"miss: {miss}" + (f"; not saved: {saver.error}" if saver.error else "")
    return loaded, report


def _empty_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


class _EntrySaver:
    """Writes a cache entry, step by step; the first write the disk refuses (full, read-only,
    not a folder) deletes the partial entry, says so, and skips the remaining writes."""

    def __init__(self, folder: Path, must_save: bool):
        self.folder, self.must_save, self.error = folder, must_save, None

    @property
    def ok(self) -> bool:
        return self.error is None

    def run(self, write, *args) -> None:
        if not self.ok:
            return
        try:
            write(*args)
        except Exception as e:  # noqa: BLE001 - each writer reports a refused write its own way: OSError (Python),
            # RuntimeError (torch.save: 'unexpected pos'), Exception (tokenizers' Rust: 'No space left on device')
            there = next(p for p in [self.folder, *self.folder.parents] if p.is_dir())
            self.error = f"{type(e).__name__}: {e} ({shutil.disk_usage(there).free / 1e9:.1f} GB free there)"
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.must_save:
                raise ConfigError(f"cannot write the cold-boot cache entry {self.folder}: {self.error}") from None
            print(f"cold-boot cache {self.folder}: not saved ({self.error}); this boot serves without it, "
                  "the next one builds it again", file=sys.stderr)


def _build(config: PipelineConfig, saver: _EntrySaver | None, inputs: dict | None) -> tuple[LoadedModel, Report]:
    t = time.perf_counter()
    loaded = load(config)
    load_s = time.perf_counter() - t
    report = compress(loaded, config)
    report.stage_seconds = {"load": load_s, **report.stage_seconds}
    if saver is not None:
        t = time.perf_counter()
        saver.run(save_model, saver.folder, loaded)
        report.stage_seconds["save"] = time.perf_counter() - t
    accelerate(loaded, config, report)
    if saver is not None:
        t = time.perf_counter()
        saver.run(_save_compiled, saver.folder, inputs, report)
        report.stage_seconds["save"] += time.perf_counter() - t
    return loaded, report


def _save_compiled(folder: Path, inputs: dict, report: Report) -> None:
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        (folder / COMPILE_FILE).write_bytes(artifacts[0])
    _write_manifest(folder, inputs, report)


def _load_entry(folder: Path, inputs: dict, device: str) -> tuple[LoadedModel, Report]:
    path = folder / MANIFEST
    if not path.exists():
        raise CacheMiss("no entry" if not folder.exists() else "entry incomplete (no manifest)")
    try:
        manifest = json.loads(path.read_text())
        files, saved_inputs = manifest["files"], manifest["inputs"]
    except (ValueError, KeyError) as e:
        raise CacheMiss(f"{MANIFEST} unreadable ({type(e).__name__})") from None
    if saved_inputs != inputs:
        raise CacheMiss("the entry was built from other inputs")
    for name, expected in files.items():
        if not (folder / name).exists() or _digest(folder / name) != expected:
            raise CacheMiss(f"{name} does not match its manifest (corrupt or changed)")
    t = time.perf_counter()
    if (folder / COMPILE_FILE).exists():
        torch.compiler.load_cache_artifacts((folder / COMPILE_FILE).read_bytes())
    loaded = load_model_entry(folder, device)
    report = manifest["report"]
    report = Report(**{**report, "prune": PruneReport(**report["prune"]), "compiled": [], "cache": "hit",
                       "stage_seconds": {"cache_load": time.perf_counter() - t}})
    return loaded, report


def save_model(folder: Path, loaded: LoadedModel) -> None:
    model = loaded.model
    buffers = {f"{prefix}.{name}".lstrip("."): module._buffers[name] for prefix, module in model.named_modules()
               for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None}
    torch.save({"class": type(model).__name__, "config": model.config, "generation_config": model.generation_config,
                "name": loaded.name, "state": model.state_dict(), "buffers": buffers,
                # torchao's quantize_ tunes inductor's config, and compiled graphs are keyed on it
                "inductor_config": torch._inductor.config.save_config_portable()}, folder / MODEL_FILE)
    (loaded.processor or loaded.tokenizer).save_pretrained(folder / TOKENIZER_DIR)


def load_model_entry(folder: Path, device: str) -> LoadedModel:
    import transformers

    saved = torch.load(folder / MODEL_FILE, weights_only=False, mmap=True, map_location=device)
    torch._inductor.config.load_config(saved["inductor_config"])
    with torch.device("meta"):
        model = getattr(transformers, saved["class"])._from_config(saved["config"])
    state = saved["state"]
    for name, param in list(model.named_parameters()):
        if name in state and state[name].shape != param.shape:  # an MLP narrowed by prune.compact
            prefix, _, leaf = name.rpartition(".")
            module = model.get_submodule(prefix)
            setattr(module, leaf, nn.Parameter(torch.empty(state[name].shape, device="meta"), requires_grad=False))
            module.out_features, module.in_features = state[name].shape
    model.load_state_dict(state, assign=True, strict=True)
    for name, buffer in saved["buffers"].items():
        module, _, leaf = name.rpartition(".")
        model.get_submodule(module).register_buffer(leaf, buffer, persistent=False)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head.weight, Int8Tensor):  # quant.head: the embedding reads the head's int8 table
        model.set_input_embeddings(SharedInt8Embedding(head.weight, getattr(embed, "embed_scale", None)))
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CacheMiss("the saved model does not fill the architecture")
    model.generation_config = saved["generation_config"]
    model.eval().requires_grad_(False)  # as load_model leaves it: compiled graphs are keyed on this
    multimodal = model.config.get_text_config() is not model.config
    return LoadedModel(model, *load_preprocessing(folder / TOKENIZER_DIR, multimodal), saved["name"])


def _write_manifest(folder: Path, inputs: dict, report: Report) -> None:
    files = {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.relative_to(folder).parts[0] != INDUCTOR_DIR}
    manifest = {"inputs": inputs, "files": files, "report": {**asdict(report), "stage_seconds": {}, "cache": "hit"}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(folder / MANIFEST)  # atomic: an entry without its manifest is never used


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}
