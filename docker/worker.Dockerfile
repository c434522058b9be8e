# syntax=docker/dockerfile:1.7
# The GPU worker image: the CUDA build of torch 2.13.0, fast-hadamard-transform compiled for it, and the Celery
# worker of the `gpu` queue, one process per GPU (QUEUE.md §3). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t spinquant-worker .
# Reproducible builds: base images pinned by tag (pin them by digest for a release, README "Deploying with Docker
# Compose"), torch by version and CUDA variant, every other Python package by version
# (docker/requirements-worker.txt), fast-hadamard-transform by release tag (FHT_REF); pass
# --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) for fixed file and image timestamps.
# No secret is built in: HF_TOKEN is given to the container at run time only (docker-compose.yml).

# Dockerfile reference "ARG" (global scope): one torch pin shared by the build and the runtime stage.
# cu126: the lowest CUDA 12 build of torch 2.13.0, for the widest driver range (>= 525 with CUDA minor-version
# compatibility) and sm_70..sm_90; the plain PyPI wheel of 2.13.0 is the CUDA 13.0 build (driver >= 580).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu126

# ---------------------------------------------------------------------------------------------------------------
# Stage 1: compile fast-hadamard-transform. NVIDIA CUDA image "devel": nvcc 12.6 = the CUDA torch+cu126 was built
# with (torch.utils.cpp_extension refuses a different major version).
FROM nvidia/cuda:12.6.3-devel-ubuntu22.04 AS fht-build

# Dockerfile best practices ("Using pipes"): a failing command inside a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 22.04 universe has CPython 3.11 (the runtime's minor version, so the cp311 wheel fits); git fetches the
# extension's source below. Dockerfile best practices ("apt-get"): one layer, no recommends, lists removed.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git python3.11 python3.11-dev python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# PEP 405 virtual environment: the build's packages stay out of the distribution's Python; Ubuntu's bundled pip
# is replaced by the pinned one that resolved docker/requirements-*.txt.
ENV VIRTUAL_ENV=/opt/build-venv \
    PATH=/opt/build-venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/build-venv \
 && pip install --no-cache-dir pip==26.3

# PyTorch "Get Started" (pip, CUDA): the CUDA builds of torch are served by the PyTorch index, not by PyPI;
# then the rest of fast-hadamard-transform's [build-system] requires, pinned, for --no-build-isolation.
ARG TORCH_VERSION
ARG TORCH_CUDA
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
 && pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 packaging==26.3 ninja==1.13.2

# Its PyPI sdist (1.1.0) ships setup.py without csrc/, so the CUDA sources come from the release tag on GitHub.
ARG FHT_REF=v1.1.0
RUN git clone --depth 1 --branch "${FHT_REF}" https://github.com/Dao-AILab/fast-hadamard-transform.git /src/fht

# Its setup.py: FORCE_BUILD compiles here instead of downloading a prebuilt wheel; PyTorch "cpp_extension":
# TORCH_CUDA_ARCH_LIST picks the GPUs (A100, A10/A40, L4/L40/RTX 4090, H100/H200; setup.py adds sm_75..sm_90).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ARG SOURCE_DATE_EPOCH
ENV FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=4
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels /src/fht

# ---------------------------------------------------------------------------------------------------------------
# Stage 2: runtime. Docker Official Image "python", the API image's base: torch's CUDA wheels carry the CUDA
# user-space libraries (nvidia-* packages) and the NVIDIA Container Toolkit mounts the driver, so no CUDA base.
FROM python:3.11.14-slim-bookworm AS runtime

# Dockerfile best practices ("Using pipes"): a failing command inside a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# reproducible-builds.org SOURCE_DATE_EPOCH: BuildKit clamps timestamps to it; setuptools uses it for the wheel.
ARG SOURCE_DATE_EPOCH

# pip docs "Caching"; NVIDIA Container Toolkit "Driver capabilities": CUDA compute plus nvidia-smi; huggingface_hub
# "Environment variables": HF_HOME is the model cache volume; the SPINQUANT_* paths live in the state folder.
# Celery "Cold shutdown" (REMAP_SIGTERM): docker stop's SIGTERM gives the running job SPINQUANT_SHUTDOWN_TIMEOUT_S
# to finish, then hands it back to the queue (read by billiard at import, so it must be in the environment).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/var/cache/spinquant/huggingface \
    SPINQUANT_ARTIFACT_ROOT=/var/lib/spinquant/artifacts \
    SPINQUANT_WORK_ROOT=/var/lib/spinquant/work \
    REMAP_SIGTERM=SIGQUIT

# Dockerfile reference "USER": a fixed non-root uid/gid (same as the API image's) owning state and model cache.
RUN groupadd --system --gid 10001 spinquant \
 && useradd --system --uid 10001 --gid spinquant --home-dir /var/lib/spinquant --no-create-home \
        --shell /usr/sbin/nologin spinquant \
 && install -d -o spinquant -g spinquant /var/lib/spinquant /var/lib/spinquant/state /var/lib/spinquant/work \
        /var/lib/spinquant/artifacts /var/cache/spinquant /var/cache/spinquant/huggingface

# PyTorch "Get Started" (pip, CUDA): the same torch build the extension was compiled against (stage 1).
ARG TORCH_VERSION
ARG TORCH_CUDA
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}"

# pip "Repeatable installs": every other package pinned (transformers, datasets, celery, ...).
COPY docker/requirements-worker.txt /tmp/requirements-worker.txt
RUN pip install --no-cache-dir -r /tmp/requirements-worker.txt \
 && rm /tmp/requirements-worker.txt

# Dockerfile reference "RUN --mount=type=bind": the compiled wheel from stage 1, without a layer that holds it.
RUN --mount=type=bind,from=fht-build,source=/wheels,target=/tmp/fht-wheels \
    pip install --no-cache-dir --no-deps --no-index /tmp/fht-wheels/fast_hadamard_transform-1.1.0-*.whl

# pip "--no-index": the project with extras service and cuda, every requirement already installed above (the
# build fails here if a pin is missing), then `pip check` for consistency. The source never becomes a layer.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir --no-index --no-build-isolation "/src[service,cuda]" \
 && pip check

# Dockerfile reference "WORKDIR": the worker's writable state folder.
WORKDIR /var/lib/spinquant

# Dockerfile reference "VOLUME": the Hugging Face model cache and Celery's revoked-task state (--statedb).
VOLUME ["/var/cache/spinquant/huggingface", "/var/lib/spinquant/state"]

# Dockerfile reference "USER": the worker runs unprivileged.
USER 10001:10001

# Celery "Workers guide" (inspect ping): the main process answers while its child runs a job; gpu@<hostname>.
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.celery_app inspect ping --destination \"gpu@${HOSTNAME}\" --timeout 20 >/dev/null"]

# QUEUE.md §3 and §4: queue gpu, one process, one task reserved, a fresh child per job, revokes kept in --statedb
# (%h = this container's hostname, so replicas sharing the state volume keep separate files).
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "-n", "gpu@%h", \
     "--prefetch-multiplier=1", "--max-tasks-per-child=1", "--statedb=/var/lib/spinquant/state/%h.state", \
     "--loglevel=INFO"]
