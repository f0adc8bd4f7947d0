# syntax=docker/dockerfile:1.7
# reidfleet Re-ID server (python -m server run): Kafka consumer group member, OSNet on the GPU.
#
# Base: python:3.11-slim, not a CUDA image. PyPI's Linux x86_64 torch wheels are CUDA builds that
# bring their CUDA/cuDNN/NCCL libraries as nvidia-* wheels, so the host needs only the NVIDIA driver
# and the NVIDIA Container Toolkit. A CUDA or PyTorch base image would carry a second CUDA and a
# second torch next to the pinned one that `pip install .[server]` installs anyway.
# Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t reidfleet/server .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only the packages the server imports (it may import schemas and common, nothing of the other components).
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY common ./common
COPY server ./server
# torchvision only adds nvJPEG decoding of crops on the GPU (server/embed/osnet_torch.py); its version must be
# the one built for the torch pin in pyproject.toml (torch 2.13.0 <-> torchvision 0.28.0).
ARG TORCHVISION_VERSION=0.28.0
RUN pip install ".[server,postgres]" "torchvision==${TORCHVISION_VERSION}"

FROM ${PYTHON_IMAGE}
# libgomp: OpenVINO's CPU plugin (gender model, Intel Re-ID IRs) links against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --home-dir /var/lib/reidfleet --create-home reidfleet
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REIDFLEET_ASSETS=/assets
USER 10001
WORKDIR /var/lib/reidfleet
# 9310: /healthz and /metrics (HealthServer). Weights are mounted read-only at /assets, never baked in.
EXPOSE 9310
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9310/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]
CMD ["run", "--config", "/etc/reidfleet/server.yaml"]
