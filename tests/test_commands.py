"""The `eval` and `bench` commands, run as a user would run them."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from gemma_opt.bench import VARIANTS, error_line
from gemma_opt.cli import GEMMA_REPO, GEMMA_REVISION, main
from gemma_opt.int8_gemv import supported as int8_gemv_supported

from conftest import ROOT, repo_text


def gemma_opt(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "gemma_opt", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_importing_gemma_opt_silences_only_warnings_about_what_it_never_runs_or_cannot_change():
    """Every command began with four lines of torchao's import warnings about extensions and
    enums this package never touches, and every setup showed torch's advice to torchao's authors
    when it compiled INT8 weights; a warning about anything else still shows."""
    code = ("import gemma_opt, logging, torch, warnings\n"
            "from torchao.quantization import quantize_, Int8WeightOnlyConfig\n"
            "linear = torch.nn.Linear(64, 64, dtype=torch.bfloat16)\n"
            "quantize_(linear, Int8WeightOnlyConfig())\n"
            "with torch.inference_mode():\n"
            "    torch.compile(linear)(torch.randn(2, 64, dtype=torch.bfloat16))\n"
            "logging.getLogger('torchao').warning('Failed to load /x/torchao/_C_other.so: why')\n"
            "warnings.warn('Float9Tensor does not implement _stable_hash_for_caching.')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stderr.splitlines() if not line.startswith("  ")] == [
        "Failed to load /x/torchao/_C_other.so: why",
        "<string>:8: UserWarning: Float9Tensor does not implement _stable_hash_for_caching."], run.stderr


def test_every_command_the_repo_shows_exists_with_its_options_and_variants(capsys):
    """cog.yaml pointed to `python -m gemma_opt config --env` before that command existed."""
    shown = set(re.findall(r"-m gemma_opt ([a-z-]+)([^`|;&#\n]*)", repo_text()))
    assert {"predict", "serve", "config", "bench", "eval"} <= {command for command, _ in shown}
    for command, rest in shown:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        usage = capsys.readouterr().out
        assert done.value.code == 0, f"python -m gemma_opt {command}: no such command"
        for option in re.findall(r"(?<!\S)--[a-z][a-z-]*", rest):
            assert option in usage, f"python -m gemma_opt {command}: no option {option}"
        for names in re.findall(r"--variants? ([\w,-]+)", rest):
            assert set(names.split(",")) <= set(VARIANTS), f"python -m gemma_opt {command}{rest}: unknown variant"
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out  # Python 3.11 lists a command whose help is SUPPRESS as "==SUPPRESS=="
    for command in {command for command, _ in shown}:
        assert re.search(rf"^ +{command} +\w", listing, re.M), f"--help does not say what {command} does"


def test_the_gpu_check_names_tests_that_exist():
    """A session gets a GPU for 15 minutes at most, now and then, and scripts/gpu_check.sh is
    only run there: one test it names that has been renamed since makes pytest stop ('not
    found') and costs the whole tests step. Its variants are checked with every other
    variant name in the repo (test_every_variant_the_repo_names_is_a_bench_variant)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    named = sorted(set(re.findall(r"tests/test_\w+\.py(?:::[^\s\"]+)?", script)))
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *named],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]  # e.g. 'ERROR: not found: <node>'
    collected = run.stdout.splitlines()
    for node in named:
        assert any(line == node or line.startswith((node + "::", node + "[")) for line in collected), node


def test_every_variant_the_repo_names_is_a_bench_variant():
    """A variant renamed in bench.py leaves its old name behind in the README's tables and
    prose, the docs, and gpu_check.sh's settings and comments, where
    test_every_command_the_repo_shows_exists_with_its_options_and_variants does not look:
    each word that begins as a variant family does (int8-, bf16-, mlp25-, ...) must be a
    variant."""
    families = "|".join(sorted({name.split("-")[0] for name in VARIANTS}))
    named = set(re.findall(rf"\b(?:{families})(?:-[a-z0-9]+)+\b", repo_text()))
    assert {"hf-eager-bf16", "int8-head-compile-bmm"} <= named <= set(VARIANTS), named - set(VARIANTS)


def test_download_takes_the_token_hf_auth_login_stored_and_fails_in_one_line(tmp_path):
    """The 4B is gated: a token from $HF_TOKEN or `hf auth login` (which the command once ignored);
    what goes wrong then (here: no network) is one line, not a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def download() -> list[str]:
        run = subprocess.run([sys.executable, "-m", "gemma_opt", "download", "--dest", str(tmp_path / "weights")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
        return run.stderr.strip().splitlines()[-1]

    assert download().startswith("no Hugging Face token: gemma-3-4b-it is gated")
    (tmp_path / "token").write_text("hf_as_stored_by_hf_auth_login")
    assert download().startswith(f"could not download {GEMMA_REPO}@{GEMMA_REVISION}: LocalEntryNotFoundError: ")


@pytest.mark.slow
def test_eval_writes_json_records_and_a_plot(tmp_path):
    out = gemma_opt("eval", "--model", "gemma-3-270m", "--methods", "none,magnitude", "--ratios", "0.1,0.3",
                    "--json", str(tmp_path / "eval.json"), "--plot", str(tmp_path / "eval.png"))
    records = json.loads((tmp_path / "eval.json").read_text())
    assert [(r["method"], r["ratio"]) for r in records] == [("dense", 0), ("none", 0), ("magnitude", 0.1),
                                                             ("magnitude", 0.3)]
    for r in records:
        assert {"method", "ratio", "quantization", "perplexity", "kl_mean", "top1_agreement", "sparsity"} <= set(r)
    dense, int8, m10, m30 = records
    assert dense["kl_mean"] == pytest.approx(0, abs=1e-6) and dense["top1_agreement"] == 1
    assert m30["perplexity"] > m10["perplexity"] and m30["kl_mean"] > m10["kl_mean"] > int8["kl_mean"]
    assert m30["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| magnitude | 0.3 |" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "--methods", "foo,wanda"], "error: unknown methods ['foo']; choose from ['none', "),
    (["eval", "--ratios", "0.5,half"], "error: ratio 'half' is neither a fraction"),
    (["eval", "--methods", "wanda", "--ratios", "0.9"], "error: nothing to evaluate"),
    pytest.param(["eval", "--quantization", "int4_weight_only"], "error: int4_weight_only is not supported",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="int4 runs on CUDA")),
    (["profile", "--variant", "int8-head"], "unknown variants ['int8-head']; choose from ['hf-eager-bf16', "),
], ids=["unknown-method", "bad-ratio", "every-variant-refused", "int4-on-cpu", "unknown-variant"])
def test_eval_and_profile_refuse_what_they_cannot_run_in_one_line_before_the_model_loads(argv, message):
    """These were tracebacks (KeyError, ValueError), or a run that measured the dense model
    alone; ``/nope`` shows that nothing was loaded."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--model", "/nope"])
    assert str(done.value.code).startswith(message), done.value.code


def test_counts_that_give_no_measurement_are_refused_by_the_command_line(capsys):
    """bench took 0 or 1 new tokens and printed a decode rate of 0; 0 repeats ended in a traceback."""
    for argv, message in [(["bench", "--new-tokens", "1"], "--new-tokens: must be at least 2, got 1"),
                          (["bench-one", "--variant", "int8-eager", "--repeats", "0"], "--repeats: must be at least 1"),
                          (["eval", "--window", "1"], "--window: must be at least 2"),
                          (["profile", "--new-tokens", "many"], "--new-tokens: not a whole number: 'many'")]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and message in capsys.readouterr().err, argv


def test_a_failed_variant_is_recorded_with_its_error_not_with_torch_s_advice_after_it():
    # the end of the stderr of session 20's first H200 bench (a compile error, then dynamo's advice)
    stderr = ("    acc = tl.dot(p, v.to(tl.float32))\n          ^\n"
              "Both operands must be same dtype. Got fp64 and fp32\n\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're "
              'reporting a bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"\n\n')
    assert error_line(stderr) == "Both operands must be same dtype. Got fp64 and fp32"
    assert error_line("Traceback ...\nValueError: bad\n") == "ValueError: bad" and error_line("\n") == ""


def test_bench_reports_every_key_against_the_baseline_and_profiles_the_variants_step(tmp_path):
    out = gemma_opt("bench", "--model", "tiny-random", "--variants", "int8-eager,sparse24-bf16-compile",
                    "--prompt-tokens", "16", "--new-tokens", "8", "--repeats", "1", "--profile", "4",
                    "--json", str(tmp_path / "bench.json"))
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in records] == ["hf-eager-bf16", "int8-eager", "sparse24-bf16-compile"]
    failed = records.pop()  # no 2:4 kernels on a CPU: recorded with its reason, the others still measured
    assert "need a CUDA GPU" in failed["error"] and "| sparse24-bf16-compile | failed: " in out
    for r in records:
        assert {"variant", "setup_s", "ttft_s", "decode_tokens_per_s", "weight_bytes", "peak_memory_bytes",
                "speedup_vs_baseline", "roofline_fraction"} <= set(r)
        assert r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > r["weight_bytes"]
    assert records[0]["speedup_vs_baseline"] == 1
    assert records[1]["weight_bytes"] < records[0]["weight_bytes"]
    assert "measured read bandwidth" in out and "decoding: greedy" in out
    assert "profile" not in records[0]  # plain transformers, not the pipeline's decode step
    profile = records[1]["profile"]  # same process, after the timed runs
    assert profile["steps"] == 7 and profile["busy_device"] == "CPU" and profile["kernels"] is None
    times = [e["ms"] for e in profile["top"]]
    assert len(times) == 4 and times == sorted(times, reverse=True) and 0 < sum(times) <= profile["busy_ms"]
    assert "int8-eager on tiny-random:" in out and "7 decode steps profiled; a step:" in out
    assert f"(timed: a step {1e3 / records[1]['decode_tokens_per_s']:.2f} ms, CPU busy " in out


@pytest.mark.parametrize("top_k", [None, 0])
def test_bench_sample_decodes_with_the_service_s_sampling_defaults_in_every_process(tmp_path, top_k):
    """``--sample`` alone samples as the service does by default; ``--sample 0`` without a top-k limit."""
    out = gemma_opt("bench", "--sample", *([str(top_k)] if top_k is not None else []), "--model", "tiny-random",
                    "--variants", "int8-eager", "--prompt-tokens", "16", "--new-tokens", "6", "--repeats", "1",
                    "--json", str(tmp_path / "bench.json"))
    records = json.loads((tmp_path / "bench.json").read_text())
    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 64 if top_k is None else top_k}
    assert [r["sampling"] for r in records] == [sampling] * 2
    assert all(r["decode_tokens_per_s"] > 0 for r in records)
    assert f"decoding: {sampling}" in out


def test_bench_paired_alternates_the_variants_in_one_process_and_rates_each_against_the_first(tmp_path):
    out = gemma_opt("bench", "--paired", "3", "--model", "tiny-random", "--variants", "hf-eager-bf16,int8-head-compile",
                    "--prompt-tokens", "16", "--new-tokens", "6", "--json", str(tmp_path / "paired.json"))
    records = json.loads((tmp_path / "paired.json").read_text())
    assert [r["variant"] for r in records] == ["hf-eager-bf16", "int8-head-compile"]
    assert all(len(r["tokens_per_s_by_round"]) == 3 and r["decode_tokens_per_s"] > 0 for r in records)
    assert records[0]["paired_ratio"] == 1
    ratios = sorted(a / b for a, b in zip(*(r["tokens_per_s_by_round"] for r in reversed(records))))
    assert records[1]["paired_ratio"] == ratios[1]  # the median round's
    assert "| variant | decode tok/s (median of 3 rounds) | against hf-eager-bf16, same round (median) |" in out


def test_profile_attributes_each_decode_step_and_rates_the_int8_gemv():
    out = gemma_opt("profile", "--model", "tiny-random", "--prompt-tokens", "16", "--new-tokens", "9")
    assert "int8-head-compile on tiny-random:" in out and "8 decode steps profiled" in out
    kernel = "gemma_opt::int8_gemv" if int8_gemv_supported("cpu") else "aten::_weight_int8pack_mm"  # ours needs AVX-512 or AVX2
    gemv = next(line for line in out.splitlines() if line.strip().endswith(kernel))
    # calls a step: in each of 4 layers, ours runs q/k/v, o, gate/up and down (fused), ATen's seven linears; and the head
    assert float(gemv.split()[2]) == (4 * 4 if kernel == "gemma_opt::int8_gemv" else 4 * 7) + 1
    assert f"INT8 GEMV ({kernel}):" in out and "of the roofline" in out


def test_bench_cold_boot_times_a_cold_and_a_cached_boot_in_fresh_processes(tmp_path):
    out = gemma_opt("bench", "--cold-boot", "--model", "tiny-random", "--variants", "int8-head-compile",
                    "--json", str(tmp_path / "boot.json"))
    (record,) = json.loads((tmp_path / "boot.json").read_text())
    assert record["cached_boot"] == "hit" and record["same_answer"] is True
    # the decode step's graph, its Int8Tensor weights among the inputs AOTAutograd's key hashes, comes
    # from the cold-boot cache entry in a process with another hash seed and an empty inductor cache
    assert record["cold_compile_cache"]["aot_autograd_misses"] == record["cold_compile_cache"]["inductor_misses"] == 1
    assert record["cached_compile_cache"] == {"aot_autograd_hits": 1, "aot_autograd_misses": 0,
                                              "inductor_hits": 1, "inductor_misses": 0}
    assert "cache_load" in record["cached_stages_s"] and "prune" not in record["cached_stages_s"]
    assert record["cold_stages_s"].keys() >= {"load", "prune", "quantize", "save", "compile"}
    assert record["cached_over_cold"] == record["setup_cached_s"] / record["setup_cold_s"]
    assert "| int8-head-compile |" in out and out.count("| yes | 0 of 1, 0 of 1 |") == 1


@pytest.mark.slow
def test_bench_served_measures_a_variant_in_a_plain_process_and_through_the_cog_server(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_OPT_COMPILE_MODE", "none")  # reaches both, through the variant's config file
    monkeypatch.setenv("GEMMA_OPT_PRUNE_RATIO", "0.5")  # the variant's 0.25 wins, in the server too
    out = gemma_opt("bench", "--served", "--model", "tiny-random", "--variants", "mlp25-masked", "--prompt-tokens", "16",
                    "--new-tokens", "8", "--repeats", "2", "--json", str(tmp_path / "served.json"))
    (record,) = json.loads((tmp_path / "served.json").read_text())
    assert record["variant"] == "mlp25-masked" and record["plain_tokens_per_s"] > 0 and record["served_tokens_per_s"] > 0
    assert record["served_over_plain"] == record["served_tokens_per_s"] / record["plain_tokens_per_s"]
    assert len(record["served_output_tokens"]) == 2 and all(1 <= n <= 8 for n in record["served_output_tokens"])
    assert record["served_input_tokens"] > 12  # the chat template around ~12 words of text
    assert record["served_sparsity"] == pytest.approx(1 / 6)  # a quarter of the MLP weights: the variant was served
    assert "| mlp25-masked |" in out


def test_prebuild_writes_the_cache_entry_a_boot_then_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_OPT_MODEL", "tiny-random")
    monkeypatch.setenv("GEMMA_OPT_COMPILE_MODE", "none")
    out = gemma_opt("prebuild", "--cache-dir", str(tmp_path))
    assert "cold-boot cache: miss: no entry" in out
    (entry,) = tmp_path.iterdir()
    assert (entry / "manifest.json").exists()
    assert "cold-boot cache: hit" in gemma_opt("prebuild", "--cache-dir", str(tmp_path))
