# make demo: the main jobs end to end on tiny random models (CPU).
# make serve: the worker behind RunPod's endpoint API on 127.0.0.1:$(PORT) (tiny models unless HF_HOME is set).
# make test: the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY_HF_HOME := .cache/hf
INSTALLED := $(VENV)/.installed
TINY_MODELS := $(TINY_HF_HOME)/.built
PORT ?= 8000

.PHONY: demo serve test models clean

$(INSTALLED): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, alone: pinned to the CPU build so nothing pulls CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

$(TINY_MODELS): $(INSTALLED) tools/make_tiny_models.py tools/make_tiny_loras.py
	$(BIN)/python tools/make_tiny_models.py --hf-home $(TINY_HF_HOME)
	$(BIN)/python tools/make_tiny_loras.py --hf-home $(TINY_HF_HOME) --out .cache/loras
	touch $@

models: $(TINY_MODELS)

demo: $(TINY_MODELS)
	$(BIN)/python tools/demo.py --hf-home $(TINY_HF_HOME) --out outputs

serve: $(TINY_MODELS)
	$(BIN)/python tools/local_endpoint.py --port $(PORT)

test: $(TINY_MODELS)
	TINY_HF_HOME=$(TINY_HF_HOME) $(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache
