# syntax=docker/dockerfile:1.7
# The API image: FastAPI, the job store client, Celery's sender, and the torch-free part of quant_core.
# No torch and no CUDA here (STYLE.md principle 1; tests/test_imports.py). Build from the repository root:
#   docker build -f docker/api.Dockerfile -t spinquant-api .
# Reproducible builds: the base image is pinned by tag (pin it by digest for a release, README "Deploying with
# Docker Compose"), every Python package by version (docker/requirements-api.txt); pass
# --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) for fixed file and image timestamps.

# Docker Official Image "python": Debian 12 slim with CPython 3.11 (pyproject: requires-python >=3.11,<3.12).
FROM python:3.11.14-slim-bookworm

# Dockerfile best practices ("Using pipes"): a failing command inside a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# reproducible-builds.org SOURCE_DATE_EPOCH: BuildKit clamps timestamps to it; setuptools uses it for the wheel.
ARG SOURCE_DATE_EPOCH

# pip docs "Caching" and "Environment variables": no download cache in the image, no self-update check.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPINQUANT_ARTIFACT_ROOT=/var/lib/spinquant/artifacts

# Dockerfile reference "USER": a fixed non-root uid/gid that owns only the service's state folder.
RUN groupadd --system --gid 10001 spinquant \
 && useradd --system --uid 10001 --gid spinquant --home-dir /var/lib/spinquant --no-create-home \
        --shell /usr/sbin/nologin spinquant \
 && install -d -o spinquant -g spinquant /var/lib/spinquant /var/lib/spinquant/artifacts /var/lib/spinquant/work

# pip "Repeatable installs": every package pinned, dependencies first so code edits keep this layer cached.
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install --no-cache-dir -r /tmp/requirements-api.txt \
 && rm /tmp/requirements-api.txt

# pip "--no-deps": the project's own code only (its torch-based core dependencies are the worker's); BuildKit
# bind mount, so the source never becomes a layer. Then prove the API imports and torch is absent.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --no-cache-dir --no-deps --no-index --no-build-isolation /src \
 && python -c "import importlib.util, sys; import api.main, api.__main__, service.storage.s3, boto3; \
sys.exit('torch is in the API image' if importlib.util.find_spec('torch') else 0)"

# Dockerfile reference "WORKDIR": relative defaults (sqlite:///runs/service/...) land in the writable state folder.
WORKDIR /var/lib/spinquant

# Dockerfile reference "USER": everything from here on runs unprivileged.
USER 10001:10001

# Dockerfile reference "EXPOSE": the port `python -m api serve` listens on below.
EXPOSE 8000

# Dockerfile reference "HEALTHCHECK": GET /healthz with the standard library (the slim image has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# README "Deploying with Docker Compose": migrate the job store to head, check the artifact store (write, read,
# delete a probe), then serve on all interfaces.
CMD ["sh", "-c", "python -m api db upgrade && python -m api store check && exec python -m api serve --host 0.0.0.0 --port 8000"]
