# syntax=docker/dockerfile:1.7
# reidfleet fleet manager (python -m fleet serve) and its MQTT broker (python -m fleet broker run).
# Both read the fleet home (REIDFLEET_FLEET_HOME): fleet.yaml, fleet.db, broker/, keys/, artifacts/.
# One image for both: the broker is Debian's mosquitto driven by fleet/broker.py (generated config, CA,
# per-device passwords, ACL), so it needs the fleet code next to the mosquitto binary.
# Build from the repository root:
#   docker build -f deploy/docker/fleet.Dockerfile -t reidfleet/fleet .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY common ./common
COPY fleet ./fleet
RUN pip install ".[fleet]"

FROM ${PYTHON_IMAGE}
# mosquitto: the broker. Its package creates the `mosquitto` user that fleet/broker.py hands the files to.
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# Runs as root on purpose: mosquitto binds its port as root, then drops to user `mosquitto` itself (the
# generated config says `user mosquitto`); fleet/broker.py chowns the broker files to that user.
WORKDIR /var/lib/reidfleet
ENV REIDFLEET_FLEET_HOME=/var/lib/reidfleet/fleet
# 8883: MQTT over TLS (broker run). 8880: signed model artifacts, 9470: /healthz (serve).
EXPOSE 8883 8880 9470
ENTRYPOINT ["python", "-m", "fleet"]
CMD ["serve"]
