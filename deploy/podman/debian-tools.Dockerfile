# Prometheus and HAProxy from Debian's packages, for tests/test_compose_stack.py on machines
# that cannot pull prom/prometheus or haproxy (compose.yaml names those for users).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus haproxy python3 \
    && rm -rf /var/lib/apt/lists/*
