# The CUDA runtime image of dsaforge: GPU stages (pretrain, warmup, sparse, RL) and TrainJob nodes.
# PyTorch's PyPI build (CUDA runtime, cuBLAS, cuDNN, NCCL as nvidia-* wheels), Triton, megatron-core, MLflow, kfp and
# dsaforge, all from requirements/cuda.lock (hashed, Python 3.12), plus bubblewrap for sandboxed task code.
# The host provides the NVIDIA driver (NVIDIA container toolkit / GPU operator).
#
#   make image                                   # both images, tagged dsaforge:<version> and dsaforge-cpu:<version>
#   docker build -f docker/cuda.Dockerfile -t REGISTRY/dsaforge:TAG .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

# gcc + libc headers: Triton compiles its launcher stubs at run time. bubblewrap: the task sandbox. tini: PID 1.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap gcc libc6-dev tini \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/dsaforge

# Dependencies first (a layer that changes only with the lock), exactly the pinned, hashed versions.
COPY requirements/cuda.lock requirements/build.in requirements/
RUN python -m pip install --require-hashes --no-deps -r requirements/cuda.lock

COPY pyproject.toml setup.py README.md ./
COPY dsaforge dsaforge
COPY model model
COPY kernels kernels
COPY synth synth
COPY eval eval
COPY components components
COPY pipelines pipelines
RUN python -m pip install --no-deps --no-build-isolation . \
 && python -c "import dsaforge.components.runtime, dsaforge.pipelines, dsaforge.model.train.stages" \
 && dsaforge --version

# Unprivileged by default; pods may run as any UID (HOME and the caches are writable by all).
# The commit the image was built from, for the runs' mlflow.source.git.commit tag (the image has no .git).
ARG GIT_COMMIT=unknown
ENV DSAFORGE_GIT_COMMIT=${GIT_COMMIT}
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin dsaforge \
 && mkdir -p /workspace /cache && chmod 1777 /workspace /cache
ENV HOME=/home/dsaforge TRITON_CACHE_DIR=/cache/triton XDG_CACHE_HOME=/cache DSAFORGE_IMAGE_FLAVOR=cuda
USER 1000
WORKDIR /workspace
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dsaforge", "--help"]
