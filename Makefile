# dsaforge: `make demo` runs the tiny end-to-end pipeline, `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine, from the lock files in requirements/.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PRESET ?= tiny
# Where PyTorch's CPU build comes from (PyPI has only the CUDA build for Linux). On a GPU machine, TORCH_LOCK= keeps
# the machine's own torch (with VENV_ARGS=--system-site-packages) instead of installing the CPU build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_LOCK  ?= requirements/torch-cpu.lock
VENV_ARGS   ?=
# The locks are pinned and hashed; pip installs exactly them, never a dependency they do not name.
PIP_LOCKED := -m pip install -q --require-hashes --no-deps
UV_VERSION ?= 0.13.9
TORCH_FIND_LINKS ?= $(TORCH_INDEX)/torch/
LOCK_ARGS ?=
# make test's worker processes (pytest-xdist; one test file per worker at a time): 2 fits a 2-core CI machine,
# whose tests wait on subprocesses and servers part of the time. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST_DIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test test-latest setup setup-dev system-deps gpu-test lock clean image

$(VENV)/.base: requirements/torch-cpu.lock requirements/cpu.lock
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) $(PIP_LOCKED) -r requirements/cpu.lock
	# torch's own dependencies are in cpu.lock and already installed, so only torch is looked up on TORCH_INDEX.
	[ -z "$(TORCH_LOCK)" ] || $(PY) $(PIP_LOCKED) --extra-index-url $(TORCH_INDEX) -r $(TORCH_LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base requirements/cpu-dev.lock
	$(PY) $(PIP_LOCKED) -r requirements/cpu-dev.lock
	touch $@

setup: $(VENV)/.base system-deps
setup-dev: $(VENV)/.dev system-deps

# bubblewrap sandboxes untrusted task code (tools, verifiers, model-written code).
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "note: install bubblewrap (e.g. sudo apt-get install bubblewrap) to run task synthesis sandboxed"; fi; }
	@# chromium: the console's browser test drives Debian's build (Playwright never downloads one here).
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install chromium (e.g. sudo apt-get install chromium) to run the console's browser test"; fi; }

demo: setup
	$(VENV)/bin/dsaforge run end-to-end --preset $(PRESET)

# pytest exit status 5 means "no tests collected": that is a failure here, never a pass.
test: setup-dev
	$(PY) -m pytest -q $(PYTEST_DIST) --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# The suite against the newest releases pyproject.toml allows (not the lock): catches the next upstream break
# before users meet it. Not run by CI. torch stays the locked CPU build unless TORCH_SPEC names another.
TORCH_SPEC ?=
test-latest: system-deps
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	if [ -n "$(TORCH_SPEC)" ]; then .venv-latest/bin/python -m pip install -q "$(TORCH_SPEC)"; \
	else .venv-latest/bin/python $(PIP_LOCKED) --extra-index-url $(TORCH_INDEX) -r requirements/torch-cpu.lock; fi
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/python -m pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q $(PYTEST_DIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; \
	echo "versions tested: .venv-latest/versions.txt"; exit $$rc

gpu-test: setup-dev
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# Refresh the locks from pyproject.toml (on purpose: after changing a dependency, or to take upstream releases
# that `make test-latest` has shown to pass). uv resolves; pip installs. LOCK_ARGS passes extra uv flags,
# e.g. LOCK_ARGS="--upgrade-package transformers" or "--find-links DIR" for a local wheel mirror.
UV := $(VENV)/bin/uv
UV_COMPILE := $(UV) pip compile -q --generate-hashes --no-emit-find-links --custom-compile-command "make lock" $(LOCK_ARGS)
lock: $(VENV)/.base
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(UV_COMPILE) pyproject.toml requirements/build.in --universal --python-version 3.11 \
	  --override requirements/torch-cpu.in --no-emit-package torch --find-links $(TORCH_FIND_LINKS) -o requirements/cpu.lock
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra dev --universal --python-version 3.11 -c requirements/cpu.lock \
	  --override requirements/torch-cpu.in --no-emit-package torch --find-links $(TORCH_FIND_LINKS) -o requirements/cpu-dev.lock
	$(UV_COMPILE) requirements/torch-cpu.in --python-version 3.11 -c requirements/cpu.lock \
	  --find-links $(TORCH_FIND_LINKS) -o requirements/torch-cpu.lock
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra gpu --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 --override requirements/cuda.in -o requirements/cuda.lock

# Container images for a cluster (docker/): the CUDA runtime image (GPU stages, TrainJob nodes) and the CPU image.
# Their names are the config's defaults (pipeline.image, pipeline.cpu_image); IMAGE_PREFIX=registry.example/ to push.
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_PREFIX ?=
DOCKER       ?= docker
GIT_COMMIT   := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
image:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "error: make image needs $(DOCKER) (DOCKER=podman works too)"; exit 1; }
	$(DOCKER) build -f docker/cuda.Dockerfile --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE_PREFIX)dsaforge:$(VERSION) .
	$(DOCKER) build -f docker/cpu.Dockerfile --build-arg GIT_COMMIT=$(GIT_COMMIT) --build-arg TORCH_INDEX=$(TORCH_INDEX) -t $(IMAGE_PREFIX)dsaforge-cpu:$(VERSION) .
	@echo "built $(IMAGE_PREFIX)dsaforge:$(VERSION) and $(IMAGE_PREFIX)dsaforge-cpu:$(VERSION)"

clean:
	rm -rf build .pytest_cache
