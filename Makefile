# Quick start: `make run` (set up + the tiny pipeline on the embedded dataset), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint bench gpu-check ablation ndp-curve hires clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nextdetail run --preset tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  # the unit tier (unmarked tests): no pipeline, no Prefect server, no Dask, no S3 (< 3 min)
	$(BIN)/python -m pytest -q -m "not integration and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/shard.py
	$(BIN)/python benchmarks/decompose.py
	$(BIN)/python benchmarks/tokenizer_recon.py
	$(BIN)/python benchmarks/token_loader.py
	$(BIN)/python benchmarks/ar.py
	$(BIN)/python benchmarks/rerun.py

# Every GPU path in one process, ≤ 8 min on one H200 (issue 36): JSON lines on stdout, benchmarks/out/gpu.json, a table.
# On the lent GPU machine, which has no venv: `PYTHONPATH=. python benchmarks/gpu.py` from the repository root.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

ablation: $(STAMP)  # CART Table 4 at small scale: orders 0, 1, 3 × 3 training seeds, nine tiny pipelines (session 14: 2 h 21 min with one thread, beside other jobs)
	$(BIN)/python benchmarks/order_ablation.py

ndp-curve: $(STAMP)  # NDP: FID vs FLOPs per image, 5 estimators × 6 budgets + VAR and CART at full compute
	$(BIN)/python benchmarks/ndp_curve.py

hires: $(STAMP)  # CART ×2 (§4.2.1) against bilinear ×2: FID against real images resized ×2, row bands (make run's root)
	$(BIN)/python benchmarks/hires.py

clean:
	rm -rf nextdetail-data .nextdetail
