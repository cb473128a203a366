# make demo   train a small U-Net on generated data (creates .venv on first use)
# make test   run the test suite
# make bench  time the engine's hot paths
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Reinstall only when the package description changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e ".[test,dist]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/python examples/train_unet.py

test: venv
	$(VENV)/bin/python -m pytest -q

bench: venv
	$(VENV)/bin/python examples/benchmark.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
