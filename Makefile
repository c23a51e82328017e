# The two commands of the README. Each creates .venv and installs on first use.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-long oracle clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: it takes the CPU build on disk instead of CUDA wheels.
	# Bytecode compiled once, on both cores, leaving out the packages' own test dirs that nothing
	# imports (pip compiles every file one at a time; in a venv probe here 77 s -> 53 s). Needed:
	# PYTHONDONTWRITEBYTECODE=1 on these machines, so a module not compiled at install is compiled
	# again by every process that imports it. Files that are not Python 3.11 (torch ships one
	# for 3.12) are skipped, as pip skips them.
	$(VENV)/bin/pip install -q --no-compile torch==2.13.0
	$(VENV)/bin/pip install -q --no-compile -e '.[test]'
	$(VENV)/bin/python -c "import compileall, re, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0, rx=re.compile(r'/tests?/'))"
	touch $(STAMP)

# A second `make demo` continues the first experiment (a sweep never goes into one that exists).
demo: $(STAMP)
	if [ -f results/fourrooms_demo/sweep.yaml ]; then $(VENV)/bin/qworld resume results/fourrooms_demo; \
	else $(VENV)/bin/qworld sweep tune_configs/fourrooms_demo.yaml; fi
	$(VENV)/bin/qworld report results/fourrooms_demo

oracle: $(STAMP)
	$(VENV)/bin/qworld oracle

# Two workers, a test file each at a time (module fixtures stay in one process), the longest
# files first (tests/conftest.py LONGEST_FILES_FIRST); the tests act
# on events, never on the clock, so a busy machine changes how long they take, not what they check.
# --durations=15 prints the slowest 15 (BENCHMARKS.md "Test suite" keeps them).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -m "not long" tests

# The long runs `make test` leaves out (tests marked `long`: the chaos test).
test-long: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m long tests

clean:
	rm -rf $(VENV)
