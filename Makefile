# `make demo`, `make test` and `make docs` each create .venv and install the project first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch: taken from the local wheel directory pip is configured with where
# there is one, otherwise from PyTorch's CPU index (a plain resolve would pull a CUDA build).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test docs install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing torch (CPU build) into $(VENV)"
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install -qq --no-index --no-deps "torch==2.13.0" 2>/dev/null || \
	  $(PIP) install -qq "torch>=2.6,<=2.14.1" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple
	@echo "[setup] installing kd-pipeline and its dependencies"
	@# uv resolves and installs the same set in ~25 s (pip: ~95 s with a warm cache); torch,
	@# already installed, satisfies its requirement and stays the CPU build (never --reinstall:
	@# that would re-resolve torch to a CUDA build). --compile-bytecode as pip does: with
	@# PYTHONDONTWRITEBYTECODE set, every process would otherwise compile every import. pip if uv fails.
	@($(PIP) install -qq uv 2>/dev/null && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[dev,plot]") || \
	  $(PIP) install -qq -e ".[dev,plot]"
	@touch $@

demo: install
	@$(PY) -m stages.demo

# Two pytest workers (PYTEST_WORKERS): most tests wait on one single-threaded stage run, so two
# keep both cores busy; each worker runs one torch thread. PYTEST_MARKERS selects the tests by
# marker: the default leaves out the rest of the architecture matrix (slow_arch) and the heaviest
# multi-process kill and object-store cases (slow); .ci/run runs them after the default set.
PYTEST_MARKERS ?= not slow_arch and not slow
test: install
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} WANDB_MODE=disabled $(PY) -m pytest tests -n $${PYTEST_WORKERS:-2} --dist worksteal -m "$(PYTEST_MARKERS)"

# The documentation site (mkdocs, material theme) into site/; the reference pages under
# docs/reference/ are generated from the code first (scripts/gen_reference.py).
docs: install
	@$(PY) scripts/gen_reference.py
	@$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf runs data/build site
