# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed must not try to compile its CUDA/C++ ops at install time (no CUDA here; JIT on GPU machines).
export DS_BUILD_OPS := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests -q

DEMO_DATA := data_cache/stdlib
DEMO_RUN  := runs/demo

# The stdlib corpus is prepared once; delete data_cache/ to prepare it again.
$(DEMO_DATA)/manifest.json: | setup
	$(PY) -m data.prepare --source stdlib --out $(DEMO_DATA)

demo: setup $(DEMO_DATA)/manifest.json
	rm -rf $(DEMO_RUN)
	$(PY) -m train --config configs/demo.toml --run-dir $(DEMO_RUN)

bench: setup $(DEMO_DATA)/manifest.json
	$(PY) benchmarks/attention.py --quick
	$(PY) benchmarks/data_stream.py $(DEMO_DATA)

clean:
	rm -rf $(VENV) runs data_cache
