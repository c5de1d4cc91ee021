# Two commands on a fresh clone: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adapterkit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench install clean

$(STAMP): requirements.lock pyproject.toml tools/install.sh
	tools/install.sh $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adapterkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP)
	$(PY) bench/lora_bench.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
