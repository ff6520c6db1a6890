# dsaforge: `make demo` runs the tiny end-to-end pipeline, `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch for laptops and CI; on a GPU machine set TORCH_SPEC to the build you want (or "").
TORCH_SPEC ?= torch==2.13.0
PRESET ?= tiny

.PHONY: demo test setup setup-dev system-deps gpu-test clean

$(VENV)/.base: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	[ -z "$(TORCH_SPEC)" ] || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.base system-deps
setup-dev: $(VENV)/.dev system-deps

# bubblewrap sandboxes untrusted task code (tools, verifiers, model-written code).
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "note: install bubblewrap (e.g. sudo apt-get install bubblewrap) to run task synthesis sandboxed"; fi; }

demo: setup
	$(VENV)/bin/dsaforge run end-to-end --preset $(PRESET)

# pytest exit status 5 means "no tests collected": that is a failure here, never a pass.
test: setup-dev
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

gpu-test: setup-dev
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
