"""Scheduler links that cross hosts: with CURVE keys, gateways and workers whose public
keys the scheduler holds get in over encrypted links; a plaintext peer, or one whose key
the scheduler does not hold, is never heard: its hello registers nothing and gets nothing back. The processes are started one by one, as on
separate hosts, with DEBUG logs: no prompt or output text appears in any of them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from inflight.client import Client
from testing.stack import free_port

SECRET_WORDS = "zebra-marmalade-quartz"


def start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "--log-level", "DEBUG", *args], stdout=log, stderr=subprocess.STDOUT)


def test_curve_links_let_in_known_keys_only_and_logs_hold_no_text(tmp_path):
    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "cli", "keys", str(keys), "gateway", "worker", "stranger"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (keys / "authorized" / "stranger.key").unlink()  # made, but not let in
    front, back, port = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", free_port()
    metrics = free_port()
    log = open(tmp_path / "log", "w")
    procs = []

    def worker(name: str, *curve: str) -> subprocess.Popen:
        p = start(["worker", "--scheduler-address", back, "--device", "cpu", "--metrics-port", "0", "--worker-id", name, *curve], log)
        procs.append(p)
        return p

    try:
        procs.append(start(["scheduler", "--gateway-address", front, "--worker-address", back, "--metrics-port", str(metrics),
                            "--curve-secret-key", str(keys / "scheduler.key_secret"),
                            "--curve-authorized-keys", str(keys / "authorized")], log))
        worker("w-known", "--curve-secret-key", str(keys / "worker.key_secret"), "--curve-server-key", str(keys / "scheduler.key"))
        procs.append(start(["gateway", "--listen", f"127.0.0.1:{port}", "--scheduler-address", front, "--metrics-port", "0",
                            "--curve-secret-key", str(keys / "gateway.key_secret"),
                            "--curve-server-key", str(keys / "scheduler.key")], log))
        chat = [{"role": "user", "content": f"Repeat after me: {SECRET_WORDS}"}]

        async def ask() -> str:
            async with Client(f"127.0.0.1:{port}") as client:
                return (await client.complete(chat=chat, max_tokens=12, temperature=0)).text

        deadline = time.monotonic() + 120
        while True:
            try:
                answer = asyncio.run(ask())
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert answer
        # Two peers that speak our protocol but hold no key the scheduler knows: one
        # plaintext, one with a key pair it was never given. Each says hello as a worker.
        import urllib.request

        import zmq
        import zmq.auth

        from inflight import schema, sockets

        ctx = zmq.Context()
        stranger_public, stranger_secret = zmq.auth.load_certificate(keys / "stranger.key_secret")
        server_public, _ = zmq.auth.load_certificate(keys / "scheduler.key")
        peers = [sockets.dealer(ctx, "w-plain", back),
                 sockets.dealer(ctx, "w-stranger", back, sockets.CurveClient(stranger_public, stranger_secret, server_public))]
        hello = schema.WorkerHello("w", "SmolLM2-135M-Instruct", 8192, 49152, 16, 100, 4, incarnation="x")
        for peer in peers:  # a heartbeat first: a scheduler that heard it would answer "reannounce"
            for message in (schema.Heartbeat("w", schema.EngineStats(0, 0, 100, 100, 0, 0, 0, 0, 0.0, 0, 16)), hello):
                try:  # a refused handshake leaves no connection to queue on, and a send would wait for one
                    peer.send(schema.encode(message), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        time.sleep(2)
        answered = [peer.poll(0) for peer in peers]
        for peer in peers:
            peer.close(linger=0)
        ctx.term()
        assert answered == [0, 0]

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        alive = [line for line in text.splitlines() if line.startswith("inflight_scheduler_workers_alive{")]
        assert alive and all(line.endswith(" 1.0") for line in alive), alive  # only w-known joined
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
    logged = (tmp_path / "log").read_text()
    assert "worker w-known joined" in logged and "worker w joined" not in logged
    assert SECRET_WORDS not in logged  # no prompt
    if len(answer.strip()) >= 12:
        assert answer.strip() not in logged  # no output
