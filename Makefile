# Two commands set up a fresh machine and run:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= tpu,serve,dev

# python3.12: on PATH, or through pyenv, or a pyenv install directory.
PY312 := $(shell for c in python3.12 "env PYENV_VERSION=3.12 python3.12" $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	  if $$c -c 'import sys; assert sys.version_info[:2]==(3,12)' >/dev/null 2>&1; then echo $$c; break; fi; done)

.PHONY: venv demo test test-all clean
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	@test -n "$(PY312)" || { echo "python3.12 not found (needed by jax 0.11+)"; exit 1; }
	$(PY312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	JAX_PLATFORMS=cpu $(PY) launch/train.py --config=configs/sft.py:tiny --workdir=$${WORKDIR:-/tmp/klong_demo}

test: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest tests -m "not slow"

test-all: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest tests

clean:
	rm -rf $(VENV)
