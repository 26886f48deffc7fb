# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv/ with the pinned versions.
PYTHON ?= python3
VENV := .venv
HOST ?= 127.0.0.1
PORT ?= 5000
# Served when weights/gemma-3-4b-it is missing: the bundled Gemma 3 270M (text-only, works offline).
FALLBACK_MODEL ?= gemma-3-270m

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: install serve test test-fast schema eval bench
install: $(VENV)/.installed

serve: $(VENV)/.installed  ## the Cog HTTP server on $(HOST):$(PORT)
	GEMMA_OPT_FALLBACK_MODEL=$(FALLBACK_MODEL) $(VENV)/bin/python -m gemma_opt serve --host $(HOST) --port $(PORT)

# The second pass runs the CUDA kernels' tests in Triton's CPU interpreter (switched on before Triton is imported),
# the third our CPU kernels' tests as on a CPU with AVX2 only (on one with AVX-512 too: torch and oneDNN then use AVX2),
# with an inductor cache of its own: torch 2.13's key for a compiled graph leaves ATEN_CPU_CAPABILITY out, and a graph
# the first pass compiled for AVX-512, built again for AVX2, computed garbage (tests/test_cpu_matmul.py, session 32).
test: $(VENV)/.installed  ## the whole suite, slow tests included (~20 min on 2 cores)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_int8_gemv_cuda.py tests/test_decode_attention_cuda.py
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TORCHINDUCTOR_CACHE_DIR=$(VENV)/inductor-cache-avx2 \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_int8_gemv.py tests/test_decode_attention.py tests/test_cpu_matmul.py

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow"

schema: $(VENV)/.installed  ## regenerate .cog/openapi_schema.json after changing predict.py
	$(VENV)/bin/python -m gemma_opt schema
