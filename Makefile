# Every target that runs code first makes sure .venv exists and holds this package and what it needs.
# The install is skipped when nothing it depends on has changed since the last one (a stamp file).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; a plain "torch" could resolve to a multi-GB CUDA build. On a GPU machine:
#   make test TORCH_SPEC="torch"   (or any CUDA build you prefer)
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.phi3fast-installed
NATIVE_SRC := $(wildcard csrc/*.h csrc/*.hpp csrc/*.cpp)
DEMO_OUT ?= demo-out

.PHONY: all demo test dev lint bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(NATIVE_SRC)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[test,dev]"
	@# scikit-build-core's editable .pth also puts the repo root on sys.path, which would expose kernels/ as a
	@# top-level module named `kernels` (bitsandbytes imports a PyPI package of that name). Its import hook
	@# resolves every phi3fast module by itself, so keep only the hook line.
	sed -i '/^\//d' $(VENV)/lib/python*/site-packages/_editable_skbc_phi3fast.pth
	touch $(STAMP)

dev: $(STAMP)
	@echo "dev environment ready: source $(VENV)/bin/activate"

demo: $(STAMP)
	$(VENV)/bin/phi3fast --version
	$(VENV)/bin/phi3fast info

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/distances.py

clean:
	rm -rf build dist $(DEMO_OUT) .pytest_cache .ruff_cache
