# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# Pin torch here when the machine needs a particular build, e.g.
#   make test TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
TORCH_SPEC ?=
PY := $(VENV)/bin/python
# faiss and torch OpenMP threads spin-wait by default, which starves the other thread on small
# machines (measured 3-10x slower); passive waiting costs nothing on a big one
export OMP_WAIT_POLICY ?= passive
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q $(TORCH_SPEC))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dinoscale demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/dinoscale bench

clean:
	rm -rf $(VENV) demo_out
