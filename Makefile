# The two commands:  make demo  (the whole pipeline on SmolLM2-135M-Instruct, a real model, on the CPU)
# and  make test.
# Each creates .venv and installs what it needs first. On a machine without an NVIDIA GPU the
# CPU build of torch is installed before anything else, since a plain `torch` requirement pulls
# a multi-GB CUDA build. Override with e.g. `make test TORCH=torch==2.13.0 TORCH_INDEX=<PyTorch CPU wheel index>`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# llama-cpp-python (the `export` extra) compiles llama.cpp, for the CPU only (the parity check
# needs no GPU) and portable: a build for the build machine's own CPU (-DGGML_NATIVE=ON, the
# default) crashed in llama_decode on a cloud VM. Takes ~7 min on 2 cores, once. Override with e.g. `make test LLAMA_CMAKE_ARGS=...`.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF
RUN ?= demo-$(PROFILE)
DATA ?= data/examples/socratic_questions.jsonl
PROFILE ?= smol

export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install install-export demo export test test-fast test-long test-multi-node test-unit test-notebooks bench lint clean strip \
	colab-check min-check constraints-tested

install: $(VENV)/.installed
install-export: $(VENV)/.installed-export

# The environment and torch (the CPU build where there is no NVIDIA GPU), then the project: one pip
# install for `install` (.[dev]) and one for `install-export` (.[dev,export]), never both in a row.
$(VENV)/.torch:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: kept"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: torch comes with the project's requirements (CUDA build)"; \
	else \
		echo "no GPU: installing the CPU build $(TORCH)"; \
		$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The `export` extra on top: llama-cpp-python and llama.cpp's converter (GGUF export, parity check, tests).
$(VENV)/.installed-export: pyproject.toml $(VENV)/.torch
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || echo "building llama-cpp-python (llama.cpp for the CPU, portable): ~7 min on 2 cores, once"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[dev,export]"
	$(BIN)/python -c "from lib.ship.llamacpp import converter_dir; print('llama.cpp converter:', converter_dir())"
	touch $(VENV)/.installed $@

# Every stage, ending with the before/after summary (perplexity, questions, stop rate, one prompt
# answered by the base and the tuned model), then one chat reply. `make demo PROFILE=tiny`: seconds.
demo: install
	$(BIN)/python -m lib pipeline --run $(RUN) --data $(DATA) --profile $(PROFILE)
	@echo "Chat with the tuned model: you> Why do leaves change colour in autumn?"
	@$(BIN)/python -m lib chat --run $(RUN) --prompt "Why do leaves change colour in autumn?"
	@if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then $(BIN)/python -m lib export --run $(RUN); \
	else echo "GGUF for llama.cpp / Ollama: make export (builds llama.cpp once, ~7 min on 2 cores)"; fi
	@echo "Results: outputs/$(RUN)/ (adapter/, merged/, logs/, eval/, plots/metrics_plot.png; export/ after make export)"

# The demo run as a GGUF with an Ollama Modelfile and the parity check (after make demo).
export: install-export
	$(BIN)/python -m lib export --run $(RUN)

# Unit tests, then the six notebooks in order on the tiny profile, in a clean outputs folder.
test: install-export lint test-unit test-notebooks

lint: install-export
	$(BIN)/ruff check lib tests bench

test-unit: install-export
	$(BIN)/python -m pytest tests -q -m "not long" --durations=25

# What does not fit `make test`'s 10 minutes (~9 min on 2 cores; run before a release): SmolLM2 trained end
# to end on a task of its own, then evaluated (the verdict with its interval, the null control) and merged;
# SmolLM2's GGUF read twice and exported to q4_k_m; the two-node tests.
test-long: install-export
	$(BIN)/python -m pytest tests -q -m long --durations=5

# Two machines on one (torchrun --nnodes 2, gloo), ~90 s: outside `make test` for its time budget
# (also in `make test-long`).
test-multi-node: install-export
	$(BIN)/python -m pytest tests/test_multi_node.py -q

# The edit-test loop: unit tests without the slow ones (training, resume, the real model, the
# benchmark) and without the notebooks.
test-fast: install-export
	$(BIN)/python -m pytest tests -q -m "not slow"

test-notebooks: install-export
	rm -rf outputs/_nbval
	SFT_OUTPUTS_DIR=$(CURDIR)/outputs/_nbval SFT_PROFILE=tiny \
		$(BIN)/python -m pytest --nbval --nbval-current-env notebooks/ -q -p no:cacheprovider

# The batching modes on the tiny model (~1 min), then this project against plain TRL on SmolLM2-135M-Instruct
# (4 setups, 2 rounds, a process each: ~8 min on 2 CPU cores). Figures: bench/RESULTS.md.
bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/vs_trl.py

# Where users run it, each in its own environment outside the repository, not part of `make test`
# (README "Tested with"). Colab, simulated: Colab's package versions (bench/colab-packages.txt), the
# repository at /content/qlora-notebooks, a stand-in google.colab, the six notebooks through the setup
# cell's Colab branch on the tiny profile (~10 min the first time, then ~5).
colab-check: install
	$(BIN)/python bench/colab_check.py

# The lowest versions the project allows (constraints-min.txt): the fast unit tests and the notebooks on
# the tiny profile (~20 min on 2 cores, the first time ~5 more for the environment).
MIN_VENV ?= $(HOME)/.cache/qlora-min-check/venv
min-check:
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(MIN_VENV)/bin/python -m pip install -q -c constraints-min.txt -e ".[dev,export]"
	$(MIN_VENV)/bin/python -m pip check
	$(MIN_VENV)/bin/python -m pytest tests -q -m "not slow"
	rm -rf outputs/_nbval_min
	SFT_OUTPUTS_DIR=$(CURDIR)/outputs/_nbval_min SFT_PROFILE=tiny \
		$(MIN_VENV)/bin/python -m pytest --nbval --nbval-current-env notebooks/ -q -p no:cacheprovider

# constraints-tested.txt: the exact versions of this environment (after a passing `make test`).
constraints-tested: install-export
	$(BIN)/python bench/freeze_tested.py

# Strip outputs and execution counts from the notebooks before committing.
strip: install
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean:
	rm -rf outputs/_nbval outputs/_nbval_min .pytest_cache
