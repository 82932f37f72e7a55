# The two commands of the README: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the builds this project's machines hold on local disk (see README).
TORCH := torch==2.14.1 torchvision==0.29.1
RECIPE ?= recipes/mnist_hybrid.yaml
# The plugins shipped under plugins/, installed editable: tests and recipes (mnist_localce, mnist_simmatch, mnist_ff, mnist_sigprop) use them.
PLUGINS := plugins/layerwise-localce plugins/layerwise-simmatch plugins/layerwise-ff plugins/layerwise-sigprop

.PHONY: install train test clean

# Re-made when a pyproject changes: entry points are read at install time, not from the source.
$(BIN)/layerwise: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(addprefix -e ,$(PLUGINS))
	touch $@

install: $(BIN)/layerwise

train: install
	$(BIN)/layerwise train $(RECIPE)

# Lint first (ruff, configured in pyproject.toml, comes with the test extra), then the tests, in one
# pytest-xdist worker per core (at most 4: each holds its own torch), a test file's tests in one worker
# so that a module's trained fixtures are built once.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests plugins -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
