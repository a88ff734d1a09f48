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
NATIVE_SRC := $(wildcard csrc/*/*.h csrc/*/*.cpp)
DEMO_OUT ?= demo-out

.PHONY: all demo test dev lint bench report clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(NATIVE_SRC)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" "numpy>=1.24"
	$(PIP) install -q --no-build-isolation -e ".[test,dev,bench]"
	@# scikit-build-core's editable .pth also puts the repo root on sys.path, which would expose kernels/ as a
	@# top-level module named `kernels` (bitsandbytes imports a PyPI package of that name). Its import hook
	@# resolves every phi3fast module by itself, so keep only the hook line.
	sed -i '/^\//d' $(VENV)/lib/python*/site-packages/_editable_skbc_phi3fast.pth
	touch $(STAMP)

dev: $(STAMP)
	@echo "dev environment ready: source $(VENV)/bin/activate"

# The main job on embedded defaults: RAG over docs/, then QLoRA on a tiny Phi-3 (init, train, generate, answer).
DEMO_Q ?= How do I resume an interrupted training run?
DEMO_SYSTEM ?= You are the phi3fast assistant. Answer briefly.
demo: $(STAMP)
	$(VENV)/bin/phi3fast --version
	rm -rf $(DEMO_OUT)
	@echo "== RAG: index the project's own docs/ and search them"
	$(VENV)/bin/phi3fast index docs --out $(DEMO_OUT)/docs.idx
	$(VENV)/bin/phi3fast query "$(DEMO_Q)" --index $(DEMO_OUT)/docs.idx -k 3
	@echo "== Fine-tuning: a tiny Phi-3, a QLoRA adapter trained on phi3fast/assets/demo_train.jsonl"
	$(VENV)/bin/phi3fast init-tiny $(DEMO_OUT)/tiny
	$(VENV)/bin/phi3fast train --model $(DEMO_OUT)/tiny --data phi3fast/assets/demo_train.jsonl \
		--out $(DEMO_OUT)/adapter --max-steps 64 --batch-size 4 --seq-len 128 --lr 1e-2 --warmup 4 --save-every 32
	$(VENV)/bin/phi3fast generate --model $(DEMO_OUT)/tiny --adapter $(DEMO_OUT)/adapter \
		--system "$(DEMO_SYSTEM)" --max-new-tokens 48 "What does phi3fast do?"
	@echo "== Both: a cited answer from the fine-tuned tiny model over the docs index (its prose is not meaningful)"
	$(VENV)/bin/phi3fast query "$(DEMO_Q)" --index $(DEMO_OUT)/docs.idx -k 3 \
		--model $(DEMO_OUT)/tiny --adapter $(DEMO_OUT)/adapter --max-new-tokens 24
	@echo "demo outputs in $(DEMO_OUT)/ (adapter/loss.png, adapter/metrics.jsonl)"

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

# Each script runs phi3fast and its peer on the same work in one run and prints the ratio; JSON in bench/results/.
bench: $(STAMP)
	$(PY) bench/distances.py
	$(PY) bench/quant.py
	$(PY) bench/kernel_ops.py
	$(PY) bench/ann.py --quick
	$(PY) bench/rag.py --quick
	$(PY) bench/train.py

# The AOT compile report for sm_80/sm_90 (no GPU needed; exits 1 on a compile error or a spill).
report: $(STAMP)
	$(PY) -m phi3fast.kernels.report

clean:
	rm -rf build dist $(DEMO_OUT) .pytest_cache .ruff_cache
