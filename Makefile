# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the builds this project's machines hold on local disk (see README).
TORCH := torch==2.14.1 torchvision==0.29.1
RECIPE ?= recipes/mnist_hybrid.yaml

.PHONY: install train test clean

$(BIN)/layerwise: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/layerwise

train: install
	$(BIN)/layerwise train $(RECIPE)

test: install
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) runs .pytest_cache
