# syntax=docker/dockerfile:1.7
# reidfleet dashboard (streamlit run dashboard/app.py). It reads the server's PostgreSQL store and Qdrant
# collection, the fleet inventory, and reid_output for the live page. Search by example image embeds the
# query with the server's own embedder (server.embed), so the image carries the server package and its extra
# (torch runs on the CPU here; no GPU is reserved for the dashboard).
# Build from the repository root:
#   docker build -f deploy/docker/dashboard.Dockerfile -t reidfleet/dashboard .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY common ./common
COPY dashboard ./dashboard
COPY server ./server
RUN pip install ".[dashboard,server,postgres]"

FROM ${PYTHON_IMAGE}
# libgomp: OpenVINO's CPU plugin (server.embed's Intel IRs) links against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# streamlit runs a script by path: keep the app sources next to the installed package.
COPY dashboard /app/dashboard
RUN useradd --system --uid 10001 --home-dir /var/lib/reidfleet --create-home reidfleet
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REIDFLEET_DASHBOARD_CONFIG=/etc/reidfleet/dashboard.yaml \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_SERVER_HEADLESS=true
USER 10001
WORKDIR /var/lib/reidfleet
EXPOSE 8501
# Streamlit's own liveness endpoint.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["streamlit", "run", "/app/dashboard/app.py", "--server.address=0.0.0.0", "--server.port=8501"]
