"""compose.yaml brought up for real under podman: our image built from the Dockerfile on a
Debian base made with debootstrap (registries cannot be reached here), Prometheus and HAProxy
from Debian's packages, and an OTLP receiver double in the collector's place
(deploy/podman/compose.override.yaml). Requests go through the one published port to both
gateway replicas; each request's trace is found whole at the receiver and its metrics through
Prometheus's query API; a worker container is killed and comes back; then it all comes down.

Skipped where podman is not installed. Slow: see README.md, "Containers", for its time.
`python -m testing.compose_stack` makes the same checks against the official images.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testing.compose_stack import check_prometheus, check_traces, log, one_request, receiver_spans, send_requests, wait_for

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".containers"  # ignored: the debootstrap tree, the pip config for builds, logs
PROJECT = "inflight-stack-test"
BASE_IMAGE = os.environ.get("INFLIGHT_TEST_BASE_IMAGE", "localhost/inflight-base:bookworm")
IMAGE = "localhost/inflight:cpu"
TOOLS_IMAGE = "localhost/inflight-debian-tools:bookworm"
SERVICES = ["scheduler", "worker", "gateway", "gateway-lb", "otel-collector", "prometheus"]

pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (apt-get install podman runc debootstrap): "
                              "compose.yaml was not brought up"),
    pytest.mark.timeout(1800),
]

if shutil.which("podman"):
    # vfs storage, cgroupfs, runc and ulimits within the machine's limits, unless set already
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy/podman/containers.conf"))
    os.environ.setdefault("CONTAINERS_STORAGE_CONF", str(ROOT / "deploy/podman/storage.conf"))


def podman(*args, timeout=600, check=True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.returncode}\n{out.stderr[-4000:]}")
    return out.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_storage() -> None:
    # The first podman command on a machine records its storage driver in podman's database;
    # named here, it matches the --storage-driver that conmon's exit command passes when a
    # container dies (a database made without it refuses that command, and no restart happens).
    podman("--storage-driver", "vfs", "info", "--format", "{{.Store.GraphDriverName}}")


def ensure_base_image() -> None:
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    assert shutil.which("debootstrap"), f"{BASE_IMAGE} is missing and debootstrap is not installed"
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates,make",
                    "bookworm", str(rootfs)], check=True, capture_output=True, timeout=1200)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
    tar.wait()
    shutil.rmtree(rootfs)  # 300 MB, needed only for the import


def pip_build_volumes() -> list[str]:
    """This machine's pip settings (index, find-links, constraints, CA bundle) for pip inside a
    build: one pip.conf mounted as /etc/pip.conf, and every local path it names mounted as is."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    WORK.mkdir(exist_ok=True)
    conf = WORK / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    volumes = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":  # a local index's pages link to files beside it
                path = path.parent
            if path.is_absolute() and path.exists():
                volumes += ["-v", f"{path}:{path}:ro"]
    return volumes


def build_images() -> None:
    common = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *pip_build_volumes()]
    podman(*common, "-t", IMAGE, str(ROOT), timeout=1800)
    podman(*common, "-f", str(ROOT / "deploy/podman/debian-tools.Dockerfile"), "-t", TOOLS_IMAGE,
           str(ROOT / "deploy/podman"), timeout=1800)


def compose(*args, env, timeout=900, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "podman_compose", "-p", PROJECT, "-f", str(ROOT / "compose.yaml"),
           "-f", str(ROOT / "deploy/podman/compose.override.yaml"), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman-compose {' '.join(args)}: {out.returncode}\n{out.stderr[-4000:]}")
    return out


def containers() -> dict[str, str]:
    """{container name: service} of the project."""
    rows = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                  "--format", '{{.Names}} {{index .Labels "com.docker.compose.service"}}')
    return dict(line.split() for line in rows.splitlines() if line.strip())


class HealthChecks(threading.Thread):
    """Runs every container's health check every few seconds: podman schedules them with
    systemd timers, and these machines have no systemd. podman 4.3 also leaves depends_on's
    service_healthy to the caller, so the test waits on these results itself."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stopped = threading.Event()
        self.healthy: dict[str, bool] = {}

    def run(self):
        while not self.stopped.is_set():
            for name in containers():
                out = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=60)
                self.healthy[name] = out.returncode == 0
            self.stopped.wait(3)

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            names = containers()
            if len(names) >= len(SERVICES) + 1 and all(self.healthy.get(n) for n in names):
                return
            time.sleep(2)
        raise AssertionError(f"not healthy within {timeout} s: {self.healthy}\n" + logs_tail())


def logs_tail() -> str:
    return "\n".join(f"--- {name}\n" + podman("logs", "--tail", "30", name, check=False)[-3000:]
                     for name in containers())


@pytest.fixture(scope="module")
def stack():
    timings = {}
    t0 = time.monotonic()
    ensure_storage()
    ensure_base_image()
    timings["base image"] = time.monotonic() - t0
    t = time.monotonic()
    build_images()
    timings["image builds"] = time.monotonic() - t
    ports = {"INFLIGHT_PORT": free_port(), "PROMETHEUS_PORT": free_port(), "RECEIVER_PORT": free_port()}
    env = {**os.environ, "INFLIGHT_IMAGE": IMAGE, **{k: str(v) for k, v in ports.items()}}
    compose("down", "-v", env=env, check=False)
    health = HealthChecks()
    try:
        t = time.monotonic()
        compose("up", "-d", *SERVICES, env=env)
        health.start()
        health.wait_all(timeout=600)
        timings["up and healthy"] = time.monotonic() - t
        yield ports, health, timings
    finally:
        health.stopped.set()
        t = time.monotonic()
        compose("down", "-v", "-t", "10", env=env, check=False)
        timings["down"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t0
        log("compose stack timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def test_requests_traces_and_metrics_through_the_published_port(stack):
    ports, _, _ = stack
    trace_ids = send_requests(ports["INFLIGHT_PORT"])
    check_traces(trace_ids, receiver_spans(ports["RECEIVER_PORT"]))
    check_prometheus(ports["PROMETHEUS_PORT"], len(trace_ids))


def test_killed_worker_comes_back(stack):
    ports, health, _ = stack
    [worker] = [n for n, s in containers().items() if s == "worker"]
    before = int(podman("inspect", "-f", "{{.RestartCount}}", worker).strip() or 0)
    pid = int(podman("inspect", "-f", "{{.State.Pid}}", worker).strip())
    os.kill(pid, signal.SIGKILL)  # the worker process dies, as in a crash
    wait_for("worker restarted by its restart policy (none if podman's database was made without --storage-driver vfs: podman system reset)", lambda: int(podman("inspect", "-f", "{{.RestartCount}}", worker).strip() or 0) > before,
             timeout=120)
    health.healthy[worker] = False
    health.wait_all(timeout=300)
    text, finished = asyncio.run(one_request(ports["INFLIGHT_PORT"], secrets.token_hex(16), "After the restart,"))
    assert text and finished is not None
