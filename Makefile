# Quick start: `make demo` and `make test`; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FG := $(VENV)/bin/facegender
STAMP := $(VENV)/.installed
SHARED ?= ../shared/data
DEMO := runs/demo

.PHONY: demo test setup clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# A short real training and evaluation on a subset of UTKFace (the bundled model comes in a later release).
demo: $(STAMP)
	@if [ ! -d "$(SHARED)/utkface" ]; then \
	  echo "No UTKFace at $(SHARED)/utkface. Point the demo at it with: make demo SHARED=/path/to/data"; \
	  echo "or prepare your own data: $(FG) prepare folder SRC OUT && $(FG) train --data OUT --out runs/mine --weights none"; \
	  exit 0; fi
	$(FG) prepare utkface $(SHARED)/utkface data/utkface
	rm -rf $(DEMO)
	$(FG) train --data data/utkface --out $(DEMO) --weights none --epochs 2 --max-train-images 3000
	$(FG) predict $(DEMO) $$(ls -d $(SHARED)/utkface/* | head -n 4)

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/infer_throughput.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
