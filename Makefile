# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Offline first: never wait on the Hub in the demo or the tests.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install install-test demo finetune-demo test test-slow bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job: pretrain a small GPT-2 from scratch on local Python code (runs/codeparrot-local/).
demo: install
	$(VENV)/bin/lmtune train recipes/codeparrot-local.yaml --overwrite

# The fine-tuning workflow on top of the demo's model (runs/clm-finetune-stdlib-local/).
finetune-demo: install
	$(VENV)/bin/lmtune train recipes/clm-finetune-stdlib-local.yaml --overwrite

test: install-test
	$(PY) -m pytest -q

test-slow: install-test
	$(PY) -m pytest -q -m slow

# The benchmarks that need no ../shared data: one JSON line per figure on stdout, progress on stderr
# (commands are not echoed, so stdout is JSON only; benchmarks/README.md). About an hour on two CPU
# cores, most of it the baseline's and the training variants' repeated runs.
bench: install
	@$(PY) benchmarks/prep.py
	@$(PY) benchmarks/baseline_clm.py --bf16-steps 6 --bf16-warmup 2 --bf16-repeats 1
	@$(PY) benchmarks/train_clm.py --repeats 3
	@$(PY) benchmarks/generate.py
	@$(PY) benchmarks/eval_shares.py
	@$(PY) benchmarks/qa_postprocess.py

# The same scripts in their --quick form: a smoke run of a few minutes, the figures only indicative.
bench-quick: install
	@$(PY) benchmarks/prep.py --quick
	@$(PY) benchmarks/baseline_clm.py --quick
	@$(PY) benchmarks/train_clm.py --quick
	@$(PY) benchmarks/generate.py --quick
	@$(PY) benchmarks/eval_shares.py --quick
	@$(PY) benchmarks/qa_postprocess.py --examples 300

clean:
	rm -rf $(VENV) runs .pytest_cache
