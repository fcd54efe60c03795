# Two commands: `make run` and `make test`. Both create/refresh .venv themselves.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
OUT ?= runs

.PHONY: run fit test test-slow lint benchmark clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

# the default sweep: 6 Optuna trials on pollen, each a Ray Train run, logged to runs/mlflow.db;
# ends with the comparison table and the `mlflow ui` command
run: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/cicl tune $(DATA)/pollen.h5ad --trials 6 --concurrent 2 --label-key cell_type --root $(OUT) --out $(OUT)/pollen_best.h5ad --force

# one plain fit (no sweep), with a figure
fit: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/cicl fit $(DATA)/pollen.h5ad --out $(OUT)/pollen_cicl.h5ad --label-key cell_type --plot $(OUT)/pollen_cicl.png --mlflow --force

# two pytest-xdist workers: the Ray tests one after another in one, the rest beside them;
# a crashed worker ends the run (failed) instead of rerunning its tests on a fresh one
test: $(STAMP)
	$(VENV)/bin/ruff check cicl tests benchmarks tune
	$(VENV)/bin/ruff format --check cicl tests benchmarks tune
	$(VENV)/bin/python -m pytest -m "not benchmark" -q -n 2 --dist loadscope --no-loadscope-reorder --max-worker-restart=0

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m benchmark -q && HYPOTHESIS_PROFILE=slow $(VENV)/bin/python -m pytest tests/test_fuzz.py -q

benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/quality.py --data $(DATA) --seeds 3 --out benchmarks/results

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
