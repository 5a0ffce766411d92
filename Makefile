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

# Two CPU ranks (data parallel) through the DeepSpeed launcher, then the checkpoint exported to Hugging Face
# format and a greedy sample generated from it through transformers.
demo: setup $(DEMO_DATA)/manifest.json
	rm -rf $(DEMO_RUN)
	launch/run.sh --nproc 2 -- --config configs/demo.toml --run-dir $(DEMO_RUN)
	$(PY) -m train.export_hf --checkpoint $(DEMO_RUN) --out $(DEMO_RUN)/hf --sample "def main("

bench: setup $(DEMO_DATA)/manifest.json
	$(PY) benchmarks/attention.py --quick
	$(PY) benchmarks/data.py $(DEMO_DATA)

clean:
	rm -rf $(VENV) runs data_cache
