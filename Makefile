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

# the demo's sweeps, most important rows first (docs/demo.md): SmolLM2 weights (w4 g64, then w3 g64), its KV block,
# Gemma-3-270M weights and KV block, then decode speed on this machine (into results/decode/, its own report).
# Committed records whose code version matches are reused; a killed demo resumes where it stopped.
DEMO_SWEEPS := "+sweep=demo" "+sweep=demo_kv" "+sweep=demo_gemma" "+sweep=demo_kv model=gemma3_270m" "+sweep=demo_decode"

demo: setup
	for s in $(DEMO_SWEEPS); do $(BIN)/python -m experiments.run -m $$s || exit 1; done
	$(BIN)/python -m report
	$(BIN)/python -m report --results-dir results/decode --no-figures --no-notebook
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
