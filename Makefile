# Two commands do all set-up on a fresh machine:
#   make demo   - main job: the default sweep on the embedded model, then tables, figures, the executed notebook and
#                 the README's table excerpt (report/readme_excerpt.py)
#   make test   - the test suite
# Both create/refresh the virtualenv in $(VENV). Where no NVIDIA GPU is visible, torch is pinned to the CPU build
# (torch==2.13.0); set TORCH_SPEC / TORCH_INDEX_URL to choose another build or index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed

.PHONY: setup demo test report readme bench clean-results

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m experiments.run -m +sweep=demo
	$(BIN)/python -m report
	$(BIN)/python -m report.readme_excerpt

# the README's excerpt of results/tables/paper.md, rewritten from the committed table
readme: setup
	$(BIN)/python -m report.readme_excerpt

report: setup
	$(BIN)/python -m report

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run_all
