#!/bin/sh
# `make test` runs this: where podman is missing, install what tests/test_compose_stack.py needs
# to bring compose.yaml up for real (Debian's podman, runc and mmdebstrap), if it can: as root,
# with apt-get. Elsewhere it says so and the test is skipped. Nothing happens when they are
# installed already. INFLIGHT_PODMAN=0 skips the install (and so the test, where podman is missing).
set -eu
missing=""
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0
if [ "${INFLIGHT_PODMAN:-1}" = 0 ]; then
    echo "deploy/podman/install.sh: INFLIGHT_PODMAN=0, not installing$missing" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "deploy/podman/install.sh: missing$missing and cannot install (needs root and apt-get):" \
         "tests/test_compose_stack.py will be skipped; as root: apt-get install podman runc mmdebstrap" >&2
    exit 0
fi
echo "deploy/podman/install.sh: missing$missing; apt-get install podman runc mmdebstrap (for tests/test_compose_stack.py)" >&2
export DEBIAN_FRONTEND=noninteractive
# Without an update first where the package lists are there and current; with one otherwise.
apt-get install -y -q podman runc mmdebstrap >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q podman runc mmdebstrap >/dev/null; } \
    || echo "deploy/podman/install.sh: apt-get install failed: tests/test_compose_stack.py will be skipped" >&2
