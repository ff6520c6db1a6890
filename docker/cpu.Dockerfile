# The CPU image of dsaforge: data preparation, task synthesis, the MLflow run tasks, and laptops/CI without a GPU.
# PyTorch's CPU build (requirements/torch-cpu.lock, from PyTorch's CPU index) and everything else from
# requirements/cpu.lock (hashed, Python 3.11), plus bubblewrap for sandboxed task code.
#
#   make image
#   docker build -f docker/cpu.Dockerfile -t REGISTRY/dsaforge-cpu:TAG .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap gcc libc6-dev tini \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/dsaforge

COPY requirements/cpu.lock requirements/torch-cpu.lock requirements/build.in requirements/
RUN python -m pip install --require-hashes --no-deps -r requirements/cpu.lock \
 && python -m pip install --require-hashes --no-deps --extra-index-url ${TORCH_INDEX} -r requirements/torch-cpu.lock

COPY pyproject.toml setup.py README.md ./
COPY dsaforge dsaforge
COPY model model
COPY kernels kernels
COPY synth synth
COPY eval eval
COPY components components
COPY pipelines pipelines
RUN python -m pip install --no-deps --no-build-isolation . \
 && python -c "import dsaforge.components.runtime, dsaforge.pipelines, dsaforge.synth.stage" \
 && dsaforge --version

# The commit the image was built from, for the runs' mlflow.source.git.commit tag (the image has no .git).
ARG GIT_COMMIT=unknown
ENV DSAFORGE_GIT_COMMIT=${GIT_COMMIT}
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin dsaforge \
 && mkdir -p /workspace /cache && chmod 1777 /workspace /cache
ENV HOME=/home/dsaforge XDG_CACHE_HOME=/cache DSAFORGE_IMAGE_FLAVOR=cpu
USER 1000
WORKDIR /workspace
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dsaforge", "--help"]
