"""compose.yaml brought up for real under podman: our image built from the Dockerfile on a
Debian base made with mmdebstrap (registries cannot be reached here), Prometheus and HAProxy
from Debian's packages in that same base, and an OTLP receiver double in the collector's place
(deploy/podman/compose.override.yaml). Requests go through the one published port to both
gateway replicas; each request's trace is found whole at the receiver and its metrics through
Prometheus's query API; a worker container is killed and comes back; then it all comes down.

`make test` installs podman, runc and mmdebstrap where they are missing and it can (root and
apt-get: deploy/podman/install.sh); elsewhere this is skipped, saying why. Slow: see README.md,
"Containers", for its time. `python -m testing.compose_stack` makes the same checks against the
official images.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from testing.compose_stack import check_prometheus, check_traces, log, one_request, receiver_spans, send_requests, wait_for
from testing.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".containers"  # ignored: the pip config for builds, mmdebstrap.log, storage.conf where overlay fails
PROJECT = "inflight-stack-test"
# Debian bookworm with what the Dockerfile needs of a base (Python with venv, make) and the two
# tools compose.override.yaml runs from it (Prometheus, HAProxy): one tree, one image.
BASE_IMAGE = "localhost/inflight-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,make,ca-certificates,prometheus,haproxy"
# Files no process here reads: docs, and the web UI's time-zone data Prometheus's package pulls in (218 MB).
BASE_LEAVE_OUT = [f"--dpkgopt=path-exclude={glob}" for glob in (
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/javascript/moment-timezone/*")]
IMAGE = "localhost/inflight:cpu"
SERVICES = ["scheduler", "worker", "gateway", "gateway-lb", "otel-collector", "prometheus"]


def skip_reason() -> str | None:
    missing = [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (as root: apt-get install podman runc mmdebstrap, "
                "which `make test` does where it can): compose.yaml was not brought up")
    if os.geteuid() != 0:
        return "not root (the test's podman keeps its storage in /var/lib/containers): compose.yaml was not brought up"
    return None


pytestmark = [
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(1800),
]


# The images are made while the rest of the suite runs (start_making_images): at low CPU and
# disk priority, so that the tests on the same cores keep theirs.
NICE = ["nice", "-n", "10", *(["ionice", "-c", "3"] if shutil.which("ionice") else [])]


def podman(*args, timeout=600, check=True, nice=False) -> str:
    out = subprocess.run([*(NICE if nice else []), "podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.returncode}\n{out.stderr[-4000:]}")
    return out.stdout


def overlay_works() -> bool:
    """Whether the kernel mounts overlayfs on /var/lib/containers' file system (not so where
    that is itself an overlay, as in most containers)."""
    root = Path("/var/lib/containers")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for d in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(tmp, d))
        options = f"lowerdir={tmp}/lower,upperdir={tmp}/upper,workdir={tmp}/work"
        if subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, f"{tmp}/merged"],
                          capture_output=True).returncode != 0:
            return False
        subprocess.run(["umount", f"{tmp}/merged"], check=True)
        return True


def configure_podman() -> str:
    """cgroupfs, runc, ulimits within the machine's limits (deploy/podman/containers.conf) and
    overlay storage (deploy/podman/storage.conf), or vfs where overlay cannot be mounted (every
    container and build step a full copy: minutes slower), unless CONTAINERS_* name others.
    Returns the storage driver."""
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "deploy/podman/containers.conf"))
    if "CONTAINERS_STORAGE_CONF" not in os.environ:
        conf = ROOT / "deploy/podman/storage.conf"
        if not overlay_works():
            WORK.mkdir(exist_ok=True)
            vfs = WORK / "storage.conf"
            vfs.write_text(conf.read_text().replace('driver = "overlay"', 'driver = "vfs"'))
            conf = vfs
        os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    driver = next(line.split("=", 1)[1].strip().strip('"') for line in Path(os.environ["CONTAINERS_STORAGE_CONF"]).read_text().splitlines()
                  if line.strip().startswith("driver"))
    # The first podman command on a machine records its storage driver in podman's database;
    # named here, it matches the --storage-driver that conmon's exit command passes when a
    # container dies (a database made without it refuses that command, and no restart happens).
    out = subprocess.run(["podman", "--storage-driver", driver, "info", "--format", "{{.Store.GraphDriverName}}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (f"podman's storage was made with another driver than {driver} "
                                 f"(`podman system reset -f` starts it afresh):\n{out.stderr[-2000:]}")
    return driver


def roomy_tmpfs() -> str | None:
    """/dev/shm where the tree can be made there (a tmpfs mounted without noexec or nodev, 4 GiB
    free): mmdebstrap then takes half the time it takes on disk (dpkg's writes and fsyncs)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, fstype, options, *_ = line.split()
        if where == "/dev/shm" and fstype == "tmpfs" and not {"noexec", "nodev"} & set(options.split(",")):
            return where if shutil.disk_usage(where).free > 4 << 30 else None
    return None


def ensure_base_image() -> None:
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return
    # mmdebstrap writes the tree as a tar to stdout, straight into `podman import` (debootstrap,
    # extracting and configuring package by package, took about twice as long for a smaller tree).
    # Twice at most (it downloads from Debian's mirror), the second time on disk.
    WORK.mkdir(exist_ok=True)
    for tmp in (roomy_tmpfs(), None):
        env = {**os.environ, "TMPDIR": tmp} if tmp else None
        with open(WORK / "mmdebstrap.log", "w+b") as log_file:
            tree = subprocess.Popen([*NICE, "mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", *BASE_LEAVE_OUT,
                                     "--dpkgopt=force-unsafe-io", "bookworm", "-"], stdout=subprocess.PIPE, stderr=log_file, env=env)
            imported = subprocess.run([*NICE, "podman", "import", "-", BASE_IMAGE], stdin=tree.stdout, capture_output=True, timeout=1200)
            tree.stdout.close()
            made = tree.wait(timeout=60)
            if made == 0 and imported.returncode == 0:
                return
            subprocess.run(["podman", "rmi", "-f", BASE_IMAGE], capture_output=True)  # a tree cut short
            log_file.seek(0)
            failure = (f"mmdebstrap: {made}, podman import: {imported.returncode}\n{log_file.read().decode()[-3000:]}\n"
                       f"{imported.stderr.decode()[-2000:]}")
            log(f"base image (TMPDIR {tmp or 'default'}) failed: {failure}")
    raise AssertionError(failure)


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


def build_image() -> None:
    podman("build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *pip_build_volumes(),
           "-t", IMAGE, str(ROOT), timeout=1800, nice=True)


class Images(threading.Thread):
    """The base image and ours, made on a thread: most of their minutes are downloads, dpkg and
    pip, which overlap the other tests' work. conftest.py starts it when the session's tests
    are collected and runs this file's tests last; the stack fixture waits for it (and starts
    it itself when this file runs alone)."""

    def __init__(self):
        super().__init__(daemon=True, name="compose-images")
        self.timings: dict[str, float] = {}
        self.failure: BaseException | None = None
        try:
            self.driver = configure_podman()  # here, before the thread: it sets os.environ
        except BaseException as e:
            self.failure = e

    def run(self):
        if self.failure is not None:
            return
        try:
            t = time.monotonic()
            ensure_base_image()
            self.timings["base image"] = time.monotonic() - t
            t = time.monotonic()
            build_image()
            self.timings["image build"] = time.monotonic() - t
        except BaseException as e:  # re-raised by wait() in the test that needs the images
            self.failure = e

    def wait(self) -> tuple[str, dict[str, float]]:
        t = time.monotonic()
        self.join()
        if self.failure is not None:
            raise self.failure
        return self.driver, {**self.timings, "waited for them": time.monotonic() - t}


_images: Images | None = None


def start_making_images() -> None:
    global _images
    if _images is None and skip_reason() is None:
        _images = Images()
        _images.start()


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
            try:
                for name in containers():
                    out = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=60)
                    self.healthy[name] = out.returncode == 0
            except (AssertionError, subprocess.TimeoutExpired) as e:  # a slow round: the next one decides
                log(f"health checks: {e}")
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
    t0 = time.monotonic()
    start_making_images()
    driver, timings = _images.wait()
    ports = {"INFLIGHT_PORT": free_port(), "PROMETHEUS_PORT": free_port(), "RECEIVER_PORT": free_port()}
    env = {**os.environ, "INFLIGHT_IMAGE": IMAGE, "INFLIGHT_BASE_IMAGE": BASE_IMAGE, **{k: str(v) for k, v in ports.items()}}
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
        # Our processes first, while the receiver still takes the spans they flush on SIGTERM:
        # podman-compose's down stops every container at once, and a gateway whose collector is
        # gone waits for its exporter to give up (past -t 10: 12 s for down, now 2).
        compose("stop", "-t", "10", "gateway-lb", "gateway", "worker", "scheduler", env=env, check=False)
        compose("down", "-v", "-t", "10", env=env, check=False)
        timings["down"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t0
        log(f"compose stack timings ({driver} storage, s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


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
    wait_for("worker restarted by its restart policy (none if podman's database was made without --storage-driver: podman system reset -f)", lambda: int(podman("inspect", "-f", "{{.RestartCount}}", worker).strip() or 0) > before,
             timeout=120)
    health.healthy[worker] = False
    health.wait_all(timeout=300)
    text, finished = asyncio.run(one_request(ports["INFLIGHT_PORT"], secrets.token_hex(16), "After the restart,"))
    assert text and finished is not None
