#!/usr/bin/env bash
# GPU check of the INT8 decode path on the gemma-3-4b-it architecture (random weights), in
# under 8 minutes (each step under its own time limit, stopped with SIGINT so that pytest
# still prints what passed and how long each test took):
#   1. the tests that need a GPU, the most telling first: the compiled decode loop's (plain
#      compile and CUDA graphs, next step queued before a token is read) on a tiny model, the
#      fused q/k/v and gate/up projections on the Triton GEMV, that sampling never waits for the
#      GPU, that int4 (tinygemm) and float8 variants build and decode (eager), that the 4B's
#      norms compile to one-pass (persistent) reductions, the greedy argmax in blocks, a
#      request that outgrows the static cache; then the Triton kernels' own
#      (tests/test_decode_attention_cuda.py, tests/test_int8_gemv_cuda.py; every GEMV tiling).
#      Only their CUDA cases: the CPU ones run in CI, and the fused projections' would build
#      the C++ kernels first. TEST_TIMEOUT=200 s (session 20's H200 ran the 50 kernel tests and
#      not one pipeline test in 150 s, in the order kernels first);
#   2. `bench`: plain transformers bf16 generate() against the default pipeline (INT8
#      weight-only, head too, our GEMV kernel with q/k/v and gate/up fused, our decode-attention
#      kernel, compiled decode step with CUDA graphs; its compile took 130 s on the H200, the
#      whole step 230 s), then its decode step profiled in the same process (`--profile`: GPU
#      busy time against the step's wall time, kernels a step, the PROFILE_TOP=15 longest
#      kernels), with its CUDA graphs and no second compile. VARIANTS= picks others, e.g.
#      int8-head-compile-bmm (the attention as two bmm calls, run 3's), int8-head-compile-unfused
#      (a GEMV call per projection, as in run 3), bf16-compile, int4-compile (tinygemm, never
#      run yet) or int8-head-compile-aten (torchao's path); each compile is ~2 minutes, so a
#      second one needs KERNEL_CHECKS=0 (skips step 1), e.g.
#      KERNEL_CHECKS=0 VARIANTS=int8-head-compile,int8-head-compile-bmm.
# Optional, each in place of part of the above within 8 minutes: KERNEL_BENCH=1 (the kernels
# alone on the 4B shapes, scripts/int8_gemv_bench.py --device cuda: ours, torchao's compiled
# path, a plain sum and bf16 cuBLAS, in GB/s, and each of our tilings; ~100 s; the H200's is in
# docs/gpu_h200/int8_gemv_bench_run3.txt), PROFILE_VARIANT= (the decode step's GPU time by
# kernel in plain compile mode, a compile of its own) and SERVED_VARIANTS= (`bench --served`:
# the variant in a plain process and through the real Cog server, with the same CUDA graphs;
# e.g. SERVED_VARIANTS=bf16-compile VARIANTS= KERNEL_CHECKS=0).
# The bench JSON in $OUT (or ./out) is rewritten after every variant, and a variant that fails
# is recorded with its error, so a cut-short run still reports.
#
#   bash scripts/gpu_check.sh prepare   # here, with pip access: wheels + tokenizer into .gpu/
#   bash scripts/gpu_check.sh           # there, on a bare CUDA machine with torch installed
#
# With the `device` tool: run "bash scripts/gpu_check.sh" with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
    # Versions pinned in requirements.txt; the machine's own torch, accelerate, huggingface_hub,
    # safetensors, numpy, Pillow, PyYAML and tqdm are used as they are.
    rm -rf .gpu && mkdir -p .gpu/wheels
    py=${PYTHON:-.venv/bin/python}
    pins=$(grep -E '^(transformers|tokenizers|torchao|pydantic|cog|requests|pillow-heif)==' requirements.txt)
    # (the Cog server for SERVED_VARIANTS: coglet and what cog and requests need, at .venv's versions)
    for pkg in $pins pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions coglet==0.23.1 \
            structlog==26.1.0 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu/wheels "$pkg"
    done
    # The Gemma 3 tokenizer (the bundled 270M's; same vocabulary as gemma-3-4b-it), without its weights.
    folder=$("$py" -c "from gemma_opt.models import _gemma_270m_folder; print(_gemma_270m_folder())")
    tar -czf .gpu/tokenizer.tar.gz -C "$folder" tokenizer.json tokenizer_config.json chat_template.jinja
    du -sh .gpu
    exit 0
fi

out=${OUT:-out}
mkdir -p "$out" /tmp/gemma_tokenizer
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
tar -xzf .gpu/tokenizer.tar.gz -C /tmp/gemma_tokenizer
export GEMMA_OPT_TOKENIZER=/tmp/gemma_tokenizer
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchao, transformers; print(torch.__version__, torchao.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"

# step LOG SECONDS LINES COMMAND...: COMMAND under a time limit into $out/LOG (a failure is noted
# there and the check goes on), then the log's last LINES lines without warnings.
step() {
    local log=$1 limit=$2 lines=$3
    shift 3
    timeout -s INT -k 15 "$limit" "$@" > "$out/$log" 2>&1 || echo "$log: exited with $?" >> "$out/$log"
    grep -v "Warning\|warn\|^W[0-9]" "$out/$log" | tail -"$lines" || true  # a log of warnings only
}

if [[ "${KERNEL_CHECKS:-1}" != 0 ]]; then
    step tests.log ${TEST_TIMEOUT:-200} 20 python3 -m pytest -v --durations=0 -p no:cacheprovider \
        "tests/test_pipeline.py::test_compiled_decode_is_one_graph_and_matches_eager_decoding_past_the_sliding_window_and_kv_buckets[cuda-reduce-overhead]" \
        "tests/test_pipeline.py::test_compiled_decode_is_one_graph_and_matches_eager_decoding_past_the_sliding_window_and_kv_buckets[cuda-default]" \
        "tests/test_pipeline.py::test_fused_projections_give_the_same_outputs_from_one_matrix_for_q_k_v_and_one_for_gate_up[cuda]" \
        tests/test_pipeline.py::test_sampling_on_a_gpu_never_waits_for_it \
        tests/test_service.py::test_on_a_gpu_each_quantization_the_web_form_offers_builds_and_decodes \
        tests/test_pipeline.py::test_on_a_gpu_the_4b_norms_reduce_their_row_in_one_pass \
        "tests/test_pipeline.py::test_blockwise_argmax_is_argmax_with_ties_nan_and_a_part_block[cuda]" \
        "tests/test_pipeline.py::test_a_request_that_fills_the_static_cache_goes_on_eagerly_with_the_same_text[cuda-reduce-overhead]" \
        tests/test_decode_attention_cuda.py tests/test_int8_gemv_cuda.py
fi
if [[ "${KERNEL_BENCH:-0}" != 0 ]]; then
    step int8_gemv_bench.log ${KERNEL_TIMEOUT:-120} 14 python3 scripts/int8_gemv_bench.py --device cuda
fi

# Optional: which kernels one variant's decode step runs and for how long in plain compile
# mode (cog.yaml's; the bench profiles the CUDA-graph step), e.g.
# PROFILE_VARIANT=int8-head-compile. Its time comes out of the bench's.
if [[ -n "${PROFILE_VARIANT:-}" ]]; then
    step profile.log ${PROFILE_TIMEOUT:-240} 20 env GEMMA_OPT_COMPILE_MODE=default \
        python3 -m gemma_opt profile --model ${MODEL:-gemma-3-4b-arch} --variant "$PROFILE_VARIANT"
fi

# CUDA graphs for the decode step: at batch 1 a 4B step is a few milliseconds of GPU work,
# less than Python's per-token overhead without them.
export GEMMA_OPT_COMPILE_MODE=${GEMMA_OPT_COMPILE_MODE:-reduce-overhead}
variants=${VARIANTS-int8-head-compile}  # VARIANTS= (empty) skips this step
if [[ -n "$variants" ]]; then
    step bench_4b_gpu.log ${BENCH_TIMEOUT:-260} 30 python3 -m gemma_opt bench --model ${MODEL:-gemma-3-4b-arch} \
        --prompt-tokens 128 --new-tokens 128 --repeats 2 --variants "$variants" --profile ${PROFILE_TOP:-15} \
        --json "$out/bench_4b_gpu.json"
    python3 -c "import json, sys; from gemma_opt.bench import profiles, table; r = json.load(open(sys.argv[1])); print(table(r)); print(profiles(r))" \
        "$out/bench_4b_gpu.json" || true
fi
if [[ -n "${SERVED_VARIANTS:-}" ]]; then
    step served_4b_gpu.log ${SERVED_TIMEOUT:-300} 8 python3 -m gemma_opt bench --served --model ${MODEL:-gemma-3-4b-arch} \
        --prompt-tokens 128 --new-tokens 128 --repeats 2 --variants "$SERVED_VARIANTS" --json "$out/served_4b_gpu.json"
fi
