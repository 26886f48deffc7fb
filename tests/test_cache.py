import os
import resource
import signal

import pytest
import torch

from gemma_opt import models
from gemma_opt.cache import COMPILE_FILE, MANIFEST, MODEL_FILE, load_and_optimize
from gemma_opt.cli import main
from gemma_opt.config import PipelineConfig
from gemma_opt.generation import SamplingParams, generate_text
from gemma_opt.models import IMAGE_ID, gemma_processor, load_preprocessing
from gemma_opt.service import Service

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, stop_at_eos=False)


def tensors(model):
    return {n: (t.dequantize() if hasattr(t, "dequantize") else t) for n, t in model.state_dict().items()}


def test_a_cached_boot_is_the_same_model_and_a_corrupt_or_changed_one_is_rebuilt(tmp_path):
    config = PipelineConfig.validated({"model": "tiny-random", "cache_dir": str(tmp_path),
                                       "prune": {"method": "neurons", "ratio": 0.25, "compact": True,
                                                 "calibration_tokens": 512}, "compile": {"mode": "none"}})
    built, report = load_and_optimize(config)
    assert report.cache == "miss: no entry"
    (entry,) = tmp_path.iterdir()
    assert {p.name for p in entry.iterdir()} >= {MODEL_FILE, MANIFEST}

    cached, again = load_and_optimize(config)
    assert again.cache == "hit" and again.prune == report.prune and again.weight_bytes_after == report.weight_bytes_after
    a, b = tensors(built.model), tensors(cached.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # int8 tables, narrower MLPs included
    assert cached.model.model.language_model.layers[0].mlp.up_proj.weight.shape[0] == 96
    assert generate_text(cached, "Hello", params=GREEDY) == generate_text(built, "Hello", params=GREEDY)

    data = bytearray((entry / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / MODEL_FILE).write_bytes(data)
    assert load_and_optimize(config)[1].cache == f"miss: {MODEL_FILE} does not match its manifest (corrupt or changed)"
    assert load_and_optimize(config)[1].cache == "hit"  # rebuilt

    (entry / MANIFEST).write_text('{"inputs": ')  # e.g. a disk that filled up
    assert load_and_optimize(config)[1].cache == f"miss: {MANIFEST} unreadable (JSONDecodeError)"
    (entry / MANIFEST).unlink()  # e.g. a boot killed while saving
    assert load_and_optimize(config)[1].cache == "miss: entry incomplete (no manifest)"

    other = config.replace(prune={"ratio": 0.5})
    assert load_and_optimize(other)[1].cache == "miss: no entry"
    assert len(list(tmp_path.iterdir())) == 2


def test_compile_artifacts_are_saved_with_the_model(tmp_path):
    config = PipelineConfig.validated({"model": "tiny-random", "cache_dir": str(tmp_path)})
    built, report = load_and_optimize(config)
    (entry,) = tmp_path.iterdir()
    assert (entry / COMPILE_FILE).stat().st_size > 0
    cached, again = load_and_optimize(config)
    assert again.cache == "hit" and again.compiled == report.compiled and "decode step" in again.compiled
    assert generate_text(cached, "Hello", params=GREEDY) == generate_text(built, "Hello", params=GREEDY)


def test_a_folder_s_tokenizer_loads_once_per_process_and_again_when_its_files_change(tmp_path):
    gemma_processor(64, 16).tokenizer.save_pretrained(tmp_path)  # the Gemma 3 tokenizer, image token included
    first, processor = load_preprocessing(tmp_path, multimodal=False)
    assert processor is None and load_preprocessing(tmp_path, multimodal=False)[0] is first
    config = tmp_path / "tokenizer_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # e.g. new weights copied in
    again, _ = load_preprocessing(tmp_path, multimodal=False)
    assert again is not first
    prompt = "Describe <start_of_image><image_soft_token><end_of_image> in a few words."
    assert again(prompt).input_ids == first(prompt).input_ids and IMAGE_ID in first(prompt).input_ids


def test_a_variant_after_a_cached_boot_loads_the_pristine_weights_without_a_second_tokenizer(tmp_path):
    """Gemma 3's tokenizer is 329 MiB resident and ~3 s to load (the 270M, 2 cores); every
    variant shares the default's, so the pristine weights come alone."""
    config = PipelineConfig.validated({"model": "tiny-random", "cache_dir": str(tmp_path), "compile": {"mode": "none"}})
    loaders = models._load_preprocessing, models._gemma_processor  # each loads a tokenizer once per process
    Service(config)  # builds the cold-boot entry
    for loader in loaders:  # the next boot, as in a new process
        loader.cache_clear()
    service = Service(config)
    assert service.default[1].cache == "hit"
    loads = [loader.cache_info().misses for loader in loaders]
    variant = service.get("magnitude", 0.3, "int8_weight_only")[0]
    assert [loader.cache_info().misses for loader in loaders] == loads
    assert variant.tokenizer is service.default[0].tokenizer and variant.processor is service.default[0].processor
    assert generate_text(variant, "Hello", params=GREEDY)


def test_a_disk_that_refuses_the_entry_costs_the_next_boot_not_this_one(tmp_path, monkeypatch):
    """A full or read-only disk under the cache: the built model serves, the partial entry is
    deleted (left, it would keep the disk full), the summary says why. ``prebuild``, whose whole
    job is the entry, fails instead, in one line, and before the model loads when it can."""
    config = PipelineConfig.validated({"model": "tiny-random", "cache_dir": str(tmp_path / "cache"),
                                       "compile": {"mode": "none"}})
    expected = generate_text(load_and_optimize(config.replace(cache_dir=None))[0], "Hello", params=GREEDY)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    on_limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))  # model.pt is 18 MB
    try:
        loaded, report = load_and_optimize(config)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, on_limit)
    assert report.cache.startswith("miss: no entry; not saved: RuntimeError: ") and "GB free there)" in report.cache
    assert list((tmp_path / "cache").iterdir()) == []
    assert generate_text(loaded, "Hello", params=GREEDY) == expected
    assert load_and_optimize(config)[1].cache == "miss: no entry"  # the next boot saves it

    blocked = tmp_path / "a-file" / "cache"  # e.g. a path that cannot be a folder
    blocked.parent.touch()
    loaded, report = load_and_optimize(config.replace(cache_dir=str(blocked)))
    assert report.cache.startswith("miss: no entry; not saved: NotADirectoryError: ")
    assert generate_text(loaded, "Hello", params=GREEDY) == expected

    monkeypatch.setenv("GEMMA_OPT_MODEL", "/nope")  # nothing to load: the error comes first
    with pytest.raises(SystemExit, match=r"^error: cannot write the cold-boot cache entry .*a-file/cache/\w+: "
                                         r"NotADirectoryError: \[Errno 20\] Not a directory"):
        main(["prebuild", "--cache-dir", str(blocked)])
