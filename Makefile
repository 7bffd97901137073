# The workbook's common tasks. Every target installs what it needs first (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 1
PYTEST_ARGS ?=

.PHONY: setup run report test test-fast lab store verdict-stability gpu-check clean-outputs

setup:
	@bash scripts/setup.sh

## run: every notebook on its embedded default parameters, then the HTML report (outputs/report/index.html)
run: setup
	$(VENV)/bin/salience run -j $(JOBS)

report: setup
	$(VENV)/bin/salience report

## test: unit and property tests, Triton kernels under the interpreter, nbval over the notebooks' stored outputs
test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=1800 $(PYTEST_ARGS)

## test-fast: skip what loads real models or a browser
test-fast: setup
	$(PY) -m pytest tests -m "not slow and not browser" $(PYTEST_ARGS)

## lab: JupyterLab on notebooks/ with the package importable
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

## verdict-stability: every notebook on its defaults with 1 and with 2 torch threads; fails if any label differs
verdict-stability: setup
	$(VENV)/bin/salience stability $(NB)

## gpu-check: on one H100/H200, within 9 minutes: kernel tests on CUDA, both kernel benchmarks at paper sizes
## (benchmarks/results/*_cuda.csv), the kernel notebooks' gpu sets, benchmarks/results/gpu_check_summary.md.
## DRY_RUN=1: on any machine, print the plan and check every step's inputs, run nothing.
## GPU_PY=python3: use a Python that already has a CUDA torch (a lent GPU machine, offline) and skip the set-up
gpu-check: $(if $(GPU_PY),,setup)
	$(or $(GPU_PY),$(PY)) scripts/gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run)

## store NB=name: re-execute a notebook in place on its defaults (the outputs nbval compares)
store: setup
	$(VENV)/bin/salience store $(NB)

clean-outputs:
	rm -rf outputs/*/ outputs/report
