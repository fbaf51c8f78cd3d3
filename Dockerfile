# One image for every process (compose.yaml and deploy/k8s/ pick the command), installed the
# way the README does: `make setup`, without the test extras. The base is a build argument:
#   CPU:  docker build -t inflight:cpu .
#   CUDA: docker build -t inflight:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
# (torch from PyPI brings its own CUDA libraries; the CUDA base adds the driver hooks.)
# Any base with Debian's or Ubuntu's apt works; tests/test_compose_stack.py builds on one
# made with mmdebstrap, since registries cannot be reached where it runs.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The README's prerequisites: Python 3.11+ with venv, and make. CUDA bases lack them.
RUN if ! command -v make >/dev/null || ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            make python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 inflight \
    && mkdir -p /app /cache && chown inflight:inflight /app /cache

USER inflight
WORKDIR /app
# The model cache: converted here at build time, then a named volume mounted on /cache
# starts as a copy of it (compose.yaml), so the conversion never runs again.
ENV INFLIGHT_CACHE=/cache \
    PATH=/app/.venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
COPY --chown=inflight Makefile pyproject.toml README.md ./
# The dependencies first, in a layer that only a change to these two files rebuilds.
RUN make deps EXTRAS= && rm -rf /home/inflight/.cache
COPY --chown=inflight protos protos
COPY --chown=inflight inflight inflight
COPY --chown=inflight models models
COPY --chown=inflight gateway gateway
COPY --chown=inflight scheduler scheduler
COPY --chown=inflight worker worker
COPY --chown=inflight cli cli
RUN make setup EXTRAS= && rm -rf /home/inflight/.cache

VOLUME /cache
# gRPC; HTTP /metrics, /health, /ready of gateway, scheduler, worker.
EXPOSE 50051 9400 9401 9402
CMD ["inflight", "serve", "--listen", "0.0.0.0:50051", "--metrics-host", "0.0.0.0"]
