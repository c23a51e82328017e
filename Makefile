# The two commands of the README. Each creates .venv and installs on first use.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test oracle clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: it takes the CPU build on disk instead of CUDA wheels.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qworld sweep tune_configs/fourrooms_demo.yaml
	$(VENV)/bin/qworld report results/fourrooms_demo

oracle: $(STAMP)
	$(VENV)/bin/qworld oracle

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV)
