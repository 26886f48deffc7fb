"""Speed and memory of pipeline variants against plain transformers bf16, in one run;
(``--cold-boot``) how long a boot takes without and with the cold-boot cache; and
(``--served``) whether a client of the real Cog server gets the decode speed measured here.

Each variant runs in a fresh process (peak RSS is per process) and prints one JSON line;
the parent adds the ratio to the baseline and the memory-bandwidth roofline.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml
from transformers.generation.streamers import BaseStreamer

from .cache import load_and_optimize
from .compilation import WARMUP_PROMPT, compile_cache_counts
from .config import PipelineConfig, env_names
from .evaluation import DEFAULT_EVAL_TEXT
from .generation import GenerationStats, SamplingParams, generate_text, stream
from .int8_gemv import int8_gemv
from .int8_gemv import supported as int8_gemv_supported
from .models import LoadedModel
from .pipeline import load, optimize, resolve_device
from .quantization import weight_bytes

BASELINE = "hf-eager-bf16"
VARIANTS = {  # name -> pipeline sections; None: plain transformers generate(), no pipeline
    BASELINE: None,
    "bf16-compile": {"quant": {"mode": "none"}},
    "int8-eager": {"quant": {"head": False}, "compile": {"mode": "none"}},
    "int8-compile": {"quant": {"head": False}},
    "int8-head-compile": {"quant": {"head": True}},  # the default pipeline
    # the default pipeline with ATen's INT8 GEMV (what inductor picks) instead of ours (int8_gemv.py)
    "int8-head-compile-aten": {"quant": {"head": True}, "compile": {"int8_gemv": False}},
    # the default pipeline with a decoded token's attention as two bmm calls instead of our CPU kernel
    "int8-head-compile-bmm": {"quant": {"head": True}, "compile": {"decode_attention": False}},
    # the default pipeline with q/k/v and gate/up as separate INT8 matrices, a kernel call each
    "int8-head-compile-unfused": {"quant": {"head": True}, "compile": {"fuse_projections": False}},
    # inductor's max-autotune (with CUDA graphs): on a GPU its Triton GEMM templates can fuse
    # the int8 -> bf16 cast into the matmul, which plain compile leaves as a separate kernel
    "int8-head-autotune": {"quant": {"head": True}, "compile": {"mode": "max-autotune"}},
    # MLP neurons pruned (``neurons``, short calibration: speed does not depend on which ones),
    # kept as zeros or compacted away; both then go through the default pipeline
    **{f"mlp{round(100 * ratio)}-{kind}": {"prune": {"method": "neurons", "ratio": ratio, "calibration_tokens": 511,
                                                       "compact": kind == "compact"}}
       for ratio in (0.25, 0.5) for kind in ("masked", "compact")},
    "fp8-compile": {"quant": {"mode": "float8_dynamic"}},
    "int4-compile": {"quant": {"mode": "int4_weight_only"}},  # tinygemm (CUDA): half of INT8's decoder bytes
    # 2:4 on PyTorch's semi-structured sparse kernels (CUDA only): compare with bf16-compile / fp8-compile
    "sparse24-bf16-compile": {"prune": {"method": "magnitude", "pattern": "2:4"},
                              "quant": {"mode": "none", "semi_structured": True}},
    "sparse24-fp8-compile": {"prune": {"method": "magnitude", "pattern": "2:4"},
                             "quant": {"mode": "float8_dynamic", "semi_structured": True}},
}


# ours (int8_gemv.py: the CPU op, the CUDA Triton kernel), ATen's CPU one
GEMV_KERNELS = ("gemma_opt::int8_gemv", "int8_gemv_kernel", "aten::_weight_int8pack_mm")


def measure_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second for reading a large buffer, best of ``repeats``: a sum over it, and
    where it runs, our INT8 GEMV over the same bytes (it reads faster than torch's sum at
    times on this CPU VM, and a roofline must not sit below what a kernel reaches)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    reads = [lambda: x.sum().item()]
    if int8_gemv_supported(device):
        rows = x.view(torch.int8).view(-1, 4096)
        vector, scale = torch.ones(1, 4096, dtype=torch.bfloat16, device=device), torch.ones(rows.shape[0], device=device)
        reads.append(lambda: int8_gemv(vector, rows, scale))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    best = float("inf")
    for _ in range(repeats):
        for read in reads:
            sync()
            t = time.perf_counter()
            read()
            sync()
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def variant_config(model: str, variant: str, **options) -> PipelineConfig:
    """Pipeline variants start from the deployment's settings (GEMMA_OPT_* variables), e.g. the
    compile mode; the baseline never runs the pipeline."""
    sections = VARIANTS[variant]
    plain = {"quant": {"mode": "none"}, "compile": {"mode": "none"}}
    return PipelineConfig.load(model=model, **options, **(plain if sections is None else sections))


def prompt_inputs(loaded, prompt_tokens: int) -> dict:
    """The first ``prompt_tokens`` tokens of the evaluation text, as model inputs."""
    ids = loaded.tokenizer(DEFAULT_EVAL_TEXT.read_text(), return_tensors="pt").input_ids[:, :prompt_tokens]
    return {"input_ids": ids.to(loaded.model.device), "attention_mask": torch.ones_like(ids).to(loaded.model.device)}


def set_up_variant(model: str, variant: str) -> tuple[LoadedModel, str, dict[str, float]]:
    """Load the model and run the variant's pipeline (none for the baseline); returns the
    model, its device and the seconds of each setup stage."""
    config = variant_config(model, variant)
    t = time.perf_counter()
    loaded = load(config)
    setup = {"load": time.perf_counter() - t}
    if VARIANTS[variant] is not None:
        report = optimize(loaded, config)
        setup.update(prune=report.stage_seconds["prune"], quantize=report.stage_seconds["quantize"],
                     compile=report.stage_seconds["compile"])
    return loaded, resolve_device(config.device), setup


def run_variant(model: str, variant: str, prompt_tokens: int, new_tokens: int, repeats: int,
                profile_top: int = 0, sample: int | None = None) -> dict:
    """Set up one variant and time its decoding, greedy or, with ``sample`` (a top-k, 0 for no
    limit), sampling with the service's other defaults; runs in its own process. With
    ``profile_top``, a pipeline variant's decode step is then profiled too (``profile_steps``),
    the same compiled step, so on a GPU its CUDA graphs, without a second compile."""
    loaded, device, setup = set_up_variant(model, variant)
    inputs = prompt_inputs(loaded, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False,
                            **({"top_k": sample} if sample is not None else {"temperature": 0}))
    runs, bandwidths = [], []
    for repeat in range(repeats + 1):  # the first run warms caches and allocators, and is dropped
        runs.append(decode_once(loaded, variant, inputs, params))
        if repeat == 0:  # setup and a generation, before the bandwidth probe's buffer
            peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        else:  # right after each timed run: this VM's bandwidth drifts by the minute
            bandwidths.append(measure_bandwidth(device))
    runs = runs[1:]
    record = {"variant": variant, "model": model, "device": device, "setup_s": sum(setup.values()),
            "setup_stages_s": setup, "ttft_s": statistics.median(r.ttft_s for r in runs),
            "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "weight_bytes": weight_bytes(loaded.model), "decode_bytes_per_token": decode_bytes(loaded.model),
            "peak_memory_bytes": peak, "bandwidth_bytes_per_s": max(bandwidths),
            "prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
            if sample is not None else "greedy"}
    if profile_top and VARIANTS[variant] is not None:
        record["profile"] = profile_steps(loaded, device, inputs, params, profile_top)
    return record


def decode_once(loaded: LoadedModel, variant: str, inputs: dict, params: SamplingParams) -> GenerationStats:
    """One timed generation: the baseline's ``generate()``, or the pipeline's decode loop."""
    stats = GenerationStats()
    if VARIANTS[variant] is None:
        hf_generate(loaded, inputs, params, stats)
    else:
        for _ in stream(loaded, inputs, params, stats):
            pass
    return stats


def paired(model: str, variants: list[str], prompt_tokens: int, new_tokens: int, rounds: int) -> list[dict]:
    """Every variant set up in this one process, then ``rounds`` rounds of one greedy generation
    each, in reversed order every other round: each variant's median decode speed, and the
    median over rounds of its ratio to the first variant's speed in the same round. This VM's
    speed drifts by the minute, so separate processes one after the other cannot resolve a few
    percent; this can. Variants share the process: one whose setup changes global settings
    (torchao's ``quantize_`` tunes inductor's) changes them for those set up after it."""
    check_variants(variants)
    loaded = {name: set_up_variant(model, name)[0] for name in variants}
    inputs = {name: prompt_inputs(loaded[name], prompt_tokens) for name in variants}
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):  # the first round warms caches and allocators, and is dropped
        for name in variants if round_ % 2 else variants[::-1]:
            stats = decode_once(loaded[name], name, inputs[name], params)
            if round_:
                rates[name].append(stats.decode_tokens_per_s)
    first = rates[variants[0]]
    return [{"variant": name, "model": model, "rounds": rounds, "decode_tokens_per_s": statistics.median(r),
             "paired_ratio": statistics.median(a / b for a, b in zip(r, first)), "tokens_per_s_by_round": r}
            for name, r in rates.items()]


def paired_table(records: list[dict]) -> str:
    first = records[0]["variant"]
    rows = [f"| variant | decode tok/s (median of {records[0]['rounds']} rounds) | against {first}, same round (median) |",
            "|---|---|---|"]
    rows += [f"| {r['variant']} | {r['decode_tokens_per_s']:.2f} | {r['paired_ratio']:.3f}x |" for r in records]
    return "\n".join(rows)


class _TokenTimes(BaseStreamer):
    """When each generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.extend([time.perf_counter()] * value.numel())
        self.prompt_seen = True

    def end(self):
        pass


def hf_generate(loaded, inputs: dict, params: SamplingParams, stats: GenerationStats) -> None:
    """The baseline: plain transformers ``generate()`` (its default dynamic cache), greedy or
    sampling as ``params`` say."""
    if params.temperature > 0:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(params.seed)
    streamer, start = _TokenTimes(), time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=params.max_new_tokens, min_new_tokens=params.max_new_tokens,
                              streamer=streamer, **sampling)
    stats.input_tokens = inputs["input_ids"].shape[1]
    stats.record(start, streamer.times)


def profile_steps(loaded: LoadedModel, device: str, inputs: dict, params: SamplingParams, top: int) -> dict:
    """One greedy generation under torch.profiler from its first token on (the eager prefill
    left out). Per decode step: the time the device that runs the kernels is busy (GPU kernels,
    CUDA-graph replays included; or the CPU's ops, self time), the wall time, on a GPU the
    number of kernels and the host's op time, and the ``top`` kernels or ops by self time.
    Busy well under wall means gaps between kernels (launches, Python); near it, the kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    stats = GenerationStats()
    tokens = stream(loaded, inputs, params, stats)
    next(tokens)  # prefill and the first token
    on_gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in tokens:
            pass
    averages = prof.key_averages()
    steps = sum(e.count for e in averages if e.key.startswith("Torch-Compiled Region")) or params.max_new_tokens - 1
    if on_gpu:  # the kernels themselves: a CPU op's self device time repeats its kernels'
        events, self_us = [e for e in averages if e.device_type == DeviceType.CUDA], lambda e: e.self_device_time_total
    else:
        events, self_us = list(averages), lambda e: e.self_cpu_time_total
    events.sort(key=lambda e: -self_us(e))
    per_step = lambda e: {"name": e.key, "ms": self_us(e) / 1e3 / steps, "calls": e.count / steps}
    gemv = next((e for e in events if e.key in GEMV_KERNELS), None)
    return {"steps": steps, "busy_device": "GPU" if on_gpu else "CPU", "tokens_per_s": stats.decode_tokens_per_s,
            "wall_ms": 1e3 / stats.decode_tokens_per_s, "busy_ms": sum(map(self_us, events)) / 1e3 / steps,
            "kernels": sum(e.count for e in events) / steps if on_gpu else None,
            "host_ms": sum(e.self_cpu_time_total for e in averages if e.device_type == DeviceType.CPU) / 1e3 / steps
            if on_gpu else None,
            "top": [per_step(e) for e in events[:top]], "int8_gemv": gemv and per_step(gemv)}


def profile_lines(variant: str, model: str, p: dict) -> list[str]:
    """``profile_steps``' record as text: a heading, then one line per kernel or op."""
    kernels = f", {p['kernels']:.0f} kernels, host ops {p['host_ms']:.2f} ms" if p["kernels"] is not None else ""
    lines = [f"{variant} on {model}: {p['tokens_per_s']:.2f} tokens/s under the profiler, {p['steps']} decode steps "
             f"profiled; a step: {p['wall_ms']:.2f} ms, {p['busy_device']} busy {p['busy_ms']:.2f} ms "
             f"({p['busy_ms'] / p['wall_ms']:.0%}){kernels}; self {p['busy_device']} time per step:"]
    return lines + [f"  {e['ms']:8.2f} ms  {e['calls']:6.1f} calls  {e['name']}" for e in p["top"]]


def profiles(records: list[dict]) -> str:
    """The profiles ``bench --profile`` recorded, as text after its table, each with its busy
    time against the timed step (the profiler slows the host, not the kernels: busy near the
    timed step means the kernels are what is left to speed up; well under it, the host)."""
    def lines(r):
        p, step_ms = r["profile"], 1e3 / r["decode_tokens_per_s"]
        heading, *kernels = profile_lines(r["variant"], r["model"], p)
        timed = f"(timed: a step {step_ms:.2f} ms, {p['busy_device']} busy {p['busy_ms'] / step_ms:.0%} of it)"
        return [heading, timed, *kernels]
    return "\n\n".join("\n".join(lines(r)) for r in records if "profile" in r)


def profile_decode(model: str, variant: str, prompt_tokens: int, new_tokens: int, top: int = 10) -> str:
    """Where one variant's decode steps spend their time (``profile_steps``, after a warm-up
    generation), and the rate at which the INT8 GEMV kernel reads the weights, against the
    measured bandwidth."""
    loaded, device, _ = set_up_variant(model, variant)
    inputs = prompt_inputs(loaded, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
    for _ in stream(loaded, inputs, params):  # caches and allocators warm
        pass
    p = profile_steps(loaded, device, inputs, params, top)
    lines = profile_lines(variant, model, p)
    if p["int8_gemv"] is not None:
        seconds = p["int8_gemv"]["ms"] / 1e3
        bandwidth = measure_bandwidth(device)
        rate = decode_bytes(loaded.model) / seconds
        lines.append(f"INT8 GEMV ({p['int8_gemv']['name']}): {seconds * 1e3:.1f} ms a step "
                     f"({seconds * p['tokens_per_s']:.0%} of it), reading the weights at {rate / 1e9:.1f} GB/s; "
                     f"measured bandwidth {bandwidth / 1e9:.1f} GB/s: a step of nothing but these calls "
                     f"would reach {rate / bandwidth:.0%} of the roofline")
    return "\n".join(lines)


def decode_bytes(model: torch.nn.Module) -> int:
    """Weight bytes read per decoded token: everything but the vision tower and projector
    (the embedding table counts in full: it is also the tied LM head, read every token)."""
    vision = sum(weight_bytes(m) for n, m in model.named_modules() if n.endswith(("vision_tower", "multi_modal_projector")))
    return weight_bytes(model) - vision


def check_variants(names: list[str]) -> None:
    """Before anything runs: every name is a known variant."""
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")


def bench(model: str, variants: list[str], prompt_tokens: int, new_tokens: int, repeats: int,
          on_record=None, profile_top: int = 0, sample: int | None = None) -> list[dict]:
    """The baseline, then each variant, each in a fresh process (``profile_top``, ``sample``:
    see ``run_variant``). A variant that fails is recorded with its error and the rest still run;
    ``on_record(records)`` sees every step, so a run cut short still leaves what it measured."""
    names = [BASELINE] + [v for v in variants if v != BASELINE]
    check_variants(names)
    records: list[dict] = []
    for name in names:
        try:
            r = run_child("bench-one", "--model", model, "--variant", name, "--prompt-tokens", str(prompt_tokens),
                          "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--profile", str(profile_top),
                          *(["--sample", str(sample)] if sample is not None else []))
        except ChildFailed as e:
            if name == BASELINE:
                raise SystemExit(f"the baseline failed: {e}") from None
            records.append({"variant": name, "model": model, "error": str(e)})
            print(f"  {name}: FAILED: {e}", file=sys.stderr)
        else:
            roofline = r["bandwidth_bytes_per_s"] / r["decode_bytes_per_token"]
            base = records[0]["decode_tokens_per_s"] if records else r["decode_tokens_per_s"]
            r.update(speedup_vs_baseline=r["decode_tokens_per_s"] / base, roofline_tokens_per_s=roofline,
                     roofline_fraction=r["decode_tokens_per_s"] / roofline)
            records.append(r)
            print(f"  {name}: {r['decode_tokens_per_s']:.2f} tokens/s", file=sys.stderr)
        if on_record:
            on_record(records)
    return records


class ChildFailed(RuntimeError):
    """A measuring process exited with an error; the message is its ``error_line``."""


def error_line(stderr: str) -> str:
    """The last line of a failed process's stderr, less torch's advice on getting more of it,
    which follows every compile error (``TORCHDYNAMO_VERBOSE``)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "TORCHDYNAMO_VERBOSE" not in line]
    return lines[-1] if lines else ""


def run_child(*args: str, env: dict | None = None) -> dict:
    """``python -m gemma_opt <args>`` in a fresh process; its stderr passes through, its last
    stdout line is the JSON record."""
    run = subprocess.run([sys.executable, "-m", "gemma_opt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env or os.environ)
    sys.stderr.write(run.stderr)
    if run.returncode:
        raise ChildFailed(error_line(run.stderr) or f"exit status {run.returncode}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_setup(model: str, variant: str, cache_dir: str) -> dict:
    """One boot with the cold-boot cache in ``cache_dir``, as ``setup()`` does it, then a short
    greedy answer (the same in a cold and a cached boot); runs in its own process."""
    config = variant_config(model, variant, cache_dir=cache_dir)
    t = time.perf_counter()
    loaded, report = load_and_optimize(config)
    setup = time.perf_counter() - t
    greedy = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False)
    return {"variant": variant, "setup_s": setup, "stages_s": report.stage_seconds, "cache": report.cache,
            "compile_cache": compile_cache_counts(), "answer": generate_text(loaded, WARMUP_PROMPT, params=greedy)}


def cold_boot(model: str, variants: list[str]) -> list[dict]:
    """Per variant, a cold boot then a cached one, each a fresh process with an empty inductor
    cache (as on a new machine): only what the cold-boot cache saved carries over."""
    records = []
    for name in variants:
        with tempfile.TemporaryDirectory() as cache_dir:
            boots = []
            for _ in ("cold", "cached"):
                with tempfile.TemporaryDirectory() as inductor_dir:
                    t = time.perf_counter()
                    boot = run_child("setup-one", "--model", model, "--variant", name, "--cache-dir", cache_dir,
                                     env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir})
                    boots.append({**boot, "process_s": time.perf_counter() - t})
        cold, cached = boots
        records.append({"variant": name, "model": model, "setup_cold_s": cold["setup_s"],
                        "setup_cached_s": cached["setup_s"], "cached_over_cold": cached["setup_s"] / cold["setup_s"],
                        "process_cold_s": cold["process_s"], "process_cached_s": cached["process_s"],
                        "cold_stages_s": cold["stages_s"], "cached_stages_s": cached["stages_s"],
                        "cold_compile_cache": cold["compile_cache"], "cached_compile_cache": cached["compile_cache"],
                        "cached_boot": cached["cache"], "same_answer": cold["answer"] == cached["answer"]})
        print(f"  {name}: cold {cold['setup_s']:.1f}s, cached {cached['setup_s']:.1f}s ({cached['cache']})",
              file=sys.stderr)
    return records


def served(model: str, variants: list[str], prompt_tokens: int, new_tokens: int, repeats: int) -> list[dict]:
    """Per variant, its decode speed in a plain process (``bench-one``: what the other tables
    report), then as a client of the real Cog server sees it (the ``tokens_per_second``
    metric, median of ``repeats`` greedy requests after one more to warm up). One after the
    other, each with the cores to itself; the server gets the variant's whole pipeline as a
    config file (GEMMA_OPT_CONFIG) and none of the pipeline's GEMMA_OPT_* variables."""
    from .cog_server import CogServer  # needs requests, which only this mode uses

    words = DEFAULT_EVAL_TEXT.read_text().split()[:prompt_tokens * 3 // 4]  # about prompt_tokens tokens
    prompt = "Continue this text:\n\n" + " ".join(words)
    check_variants(variants)
    if BASELINE in variants:
        raise SystemExit(f"{BASELINE} is plain transformers, not a pipeline the service can serve")
    pipeline_vars = env_names()
    server_env = {k: v for k, v in os.environ.items() if k not in pipeline_vars}
    records = []
    for name in variants:
        plain = run_child("bench-one", "--model", model, "--variant", name, "--prompt-tokens", str(prompt_tokens),
                          "--new-tokens", str(new_tokens), "--repeats", str(repeats))
        with tempfile.TemporaryDirectory() as tmp:
            config_file = os.path.join(tmp, "pipeline.yaml")
            with open(config_file, "w") as f:
                yaml.safe_dump(variant_config(model, name).model_dump(mode="json"), f)
            server = CogServer({"GEMMA_OPT_CONFIG": config_file}, server_env)
            try:
                health = server.wait_until_set_up()
                if health["status"] != "READY":
                    raise SystemExit(f"{name}: the server's setup failed:\n{server.tail()}")
                answers = [server.predict(prompt=prompt, max_new_tokens=new_tokens, temperature=0).json()
                           for _ in range(repeats + 1)]
            finally:
                server.stop()
        failed = [a for a in answers if a["status"] != "succeeded"]
        if failed:
            raise SystemExit(f"{name}: a prediction failed: {failed[0].get('error')}")
        metrics = [a["metrics"] for a in answers[1:]]
        rate = statistics.median(m["tokens_per_second"] for m in metrics)
        records.append({"variant": name, "model": model, "plain_tokens_per_s": plain["decode_tokens_per_s"],
                        "served_tokens_per_s": rate, "served_over_plain": rate / plain["decode_tokens_per_s"],
                        "served_input_tokens": metrics[0]["input_token_count"], "served_sparsity": metrics[0]["sparsity"],
                        "served_output_tokens": [m["output_token_count"] for m in metrics]})
        print(f"  {name}: plain {plain['decode_tokens_per_s']:.2f}, served {rate:.2f} tokens/s", file=sys.stderr)
    return records


def served_table(records: list[dict]) -> str:
    rows = ["| variant | plain process tok/s | served tok/s | served / plain | served prompt, answer tokens |",
            "|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['variant']} | {r['plain_tokens_per_s']:.2f} | {r['served_tokens_per_s']:.2f} | "
                    f"{r['served_over_plain']:.0%} | {r['served_input_tokens']}, "
                    f"{'/'.join(map(str, r['served_output_tokens']))} |")
    return "\n".join(rows)


def cold_boot_table(records: list[dict]) -> str:
    rows = ["| variant | setup_cold_s (stages) | setup_cached_s (stages) | cached / cold | same answer "
            "| graphs the cached boot compiled (AOTAutograd, inductor) |", "|---|---|---|---|---|---|"]
    stages = lambda seconds: ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    compiled = lambda counts: ", ".join(f"{counts[f'{cache}_misses']} of {counts[f'{cache}_hits'] + counts[f'{cache}_misses']}"
                                        for cache in ("aot_autograd", "inductor"))
    for r in records:
        rows.append(f"| {r['variant']} | {r['setup_cold_s']:.1f} ({stages(r['cold_stages_s'])}) | "
                    f"{r['setup_cached_s']:.1f} ({stages(r['cached_stages_s'])}) | {r['cached_over_cold']:.0%} | "
                    f"{'yes' if r['same_answer'] else 'NO'} | {compiled(r['cached_compile_cache'])} |")
    return "\n".join(rows)


def table(records: list[dict]) -> str:
    head = "| variant | setup s (load/prune/quant/compile) | TTFT s | decode tok/s | vs baseline | weights GB | peak mem GB | roofline tok/s | of roofline |"
    rows = [head, "|" + "---|" * 9]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['variant']} | failed: {r['error']} |" + " |" * 7)
            continue
        stages = "/".join(f"{r['setup_stages_s'].get(k, 0):.1f}" for k in ("load", "prune", "quantize", "compile"))
        rows.append(f"| {r['variant']} | {r['setup_s']:.1f} ({stages}) | {r['ttft_s']:.3f} | {r['decode_tokens_per_s']:.2f} "
                    f"| {r['speedup_vs_baseline']:.2f}x | {r['weight_bytes'] / 1e9:.3f} | {r['peak_memory_bytes'] / 1e9:.2f} "
                    f"| {r['roofline_tokens_per_s']:.1f} | {r['roofline_fraction']:.0%} |")
    return "\n".join(rows)
