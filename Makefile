# Quick start: `make demo` and `make test`; each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FG := $(VENV)/bin/facegender
STAMP := $(VENV)/.installed
SHARED ?= ../shared/data
DEMO := runs/demo
TRAIN_DEMO := runs/train-demo

CORE := .venv-core

.PHONY: demo train-demo test test-core setup clean bench serve docs

setup: $(STAMP)

# Everything (the core, every extra, the tests' and the docs' tools) at the versions of constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,test,docs]'
	touch $(STAMP)

# The inference core's test files run in test-core's clean environment; here, only their tests that need the
# training extra (PyTorch's answers to compare with, onnx to read the graphs) run.
test: $(STAMP)
	$(PY) -m pytest -q $(CORE_TESTS:%=--ignore=%)
	$(PY) -m pytest -q -m needs_train $(CORE_TESTS)
	$(MAKE) test-core

# The inference core as a user installs it, in a clean environment without PyTorch: the package built from
# this tree (its wheel carries the models' ONNX graphs) with only the serving extra; the predict and serve
# tests run there, then the evaluate tests once the evaluation extra is added.
CORE_TESTS := tests/test_core.py tests/test_serve.py tests/test_bundled.py tests/test_fast_predict.py \
	tests/test_detect.py tests/test_images.py tests/test_hostile.py tests/test_blazeface.py \
	tests/test_mnn.py
test-core:
	rm -rf $(CORE)
	$(PYTHON) -m venv $(CORE)
	$(CORE)/bin/python -m pip install --quiet --upgrade pip
	$(CORE)/bin/python -m pip install --quiet -c constraints.txt '.[serve]' pytest httpx scikit-image
	$(CORE)/bin/python -c 'import importlib.util as u, sys; sys.exit("torch is installed in $(CORE)" if u.find_spec("torch") else 0)'
	$(CORE)/bin/python -m pytest -q -p no:cacheprovider -m "not needs_eval and not needs_train" $(CORE_TESTS)
	$(CORE)/bin/python -m pip install --quiet -c constraints.txt '.[eval]'
	$(CORE)/bin/python -c 'import importlib.util as u, sys; sys.exit("torch is installed in $(CORE)" if u.find_spec("torch") else 0)'
	$(CORE)/bin/python -m pytest -q -p no:cacheprovider -m needs_eval $(CORE_TESTS)

# The bundled model on a real photo: scikit-image's public-domain "astronaut" (NASA portrait of Eileen Collins).
ASTRONAUT = $$($(PY) -c 'import pathlib, skimage.data; print(pathlib.Path(skimage.data.__file__).parent / "astronaut.png")')

demo: $(STAMP)
	$(FG) predict $(ASTRONAUT) --annotate $(DEMO)
	@echo "annotated copy: $(DEMO)/astronaut.png"

# The API and web page on the bundled model: http://127.0.0.1:8000/ (PORT=... to change it).
PORT ?= 8000
serve: $(STAMP)
	$(FG) serve --port $(PORT)

# A short real training, evaluation and prediction on a subset of UTKFace.
train-demo: $(STAMP)
	@if [ ! -d "$(SHARED)/utkface" ]; then \
	  echo "No UTKFace at $(SHARED)/utkface. Point it at the data with: make train-demo SHARED=/path/to/data"; \
	  echo "or prepare your own data: $(FG) prepare folder SRC OUT && $(FG) train --data OUT --out runs/mine --weights none"; \
	  exit 0; fi
	$(FG) prepare utkface $(SHARED)/utkface data/utkface
	rm -rf $(TRAIN_DEMO)
	$(FG) train --data data/utkface --out $(TRAIN_DEMO) --weights none --epochs 2 --max-train-images 3000
	$(FG) predict $(TRAIN_DEMO) $$(ls -d $(SHARED)/utkface/* | head -n 4)

# The documentation site, offline, warnings as errors (tests/test_docs.py builds it in `make test` too): build/site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/infer_throughput.py
	$(PY) benchmarks/photo_throughput.py
	$(PY) benchmarks/descriptor_throughput.py --threads 1

clean:
	rm -rf $(VENV) $(CORE) runs data .pytest_cache
