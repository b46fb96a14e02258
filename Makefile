# scaletrain: the two Quick-start commands.
#   make demo   set up .venv and train the default Llama-style model on the Python stdlib source (CPU: ~1.5 min)
#   make test   set up .venv with the dev tools, check notebooks <-> library and style, run every notebook and pytest
#   make docs   build the documentation site into _site/; make tutorials: run every notebook and store its outputs
# TORCH picks the torch build: the default pins the CPU wheel CI uses; on a GPU machine use e.g. TORCH=torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test setup setup-dev check-sync lint nbtest pytest docs tutorials clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: a bare 'torch' requirement would pull a multi-GB CUDA build
setup: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .

setup-dev: setup
	$(BIN)/python -m pip install -q -e ".[dev]"

demo: setup
	$(BIN)/scaletrain train

# The notebooks are the source: exporting and cleaning them must not change any tracked file.
check-sync:
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	@if [ -n "$$(git status --porcelain --untracked-files=all -- scaletrain nbs)" ]; then \
	  echo "nbdev_export/nbdev_clean changed files: the notebooks and scaletrain/ are out of sync:"; \
	  git status --porcelain --untracked-files=all -- scaletrain nbs; exit 1; fi
	@echo "notebooks and library in sync"

# Style (ruff.toml): 120 columns, one statement per line, pyflakes; the exported library, tests, benchmarks and notebooks.
lint:
	$(BIN)/ruff format --check --quiet nbs tests benchmarks docs examples
	$(BIN)/ruff check --quiet scaletrain tests benchmarks nbs docs examples
	@echo "ruff: clean"

nbtest:
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --timing  # two notebooks at a time on 2 cores: one thread each

# Two test files at a time (pytest-xdist; a file's tests stay on one worker, so its module fixtures run once): most
# tests wait on subprocesses (torchrun ranks, the CLI, JupyterLab), and two at a time halve the wall time on 2 cores.
PYTEST_WORKERS ?= 2
pytest:
	$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile

# The documentation site (Sphinx + myst-nb, offline) from the notebooks' stored outputs and the docstrings, in _site/.
docs: setup-dev
	$(BIN)/python docs/build_site.py _site

# Run every notebook and store its outputs in it (then strip volatile metadata), and take the README's tutorial plot
# from those outputs (docs/readme_images.py); commit the result.
tutorials: setup-dev
	OMP_NUM_THREADS=1 $(BIN)/python docs/execute.py
	$(BIN)/nbdev_clean
	$(BIN)/python docs/readme_images.py

test: setup-dev check-sync lint nbtest pytest

clean:
	rm -rf $(VENV) build *.egg-info _site _build
