"""The `inflight` command as a user meets it: a model or a setting that cannot be used is
one line naming it, with a nonzero exit and no traceback."""

import subprocess
import sys


def inflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


def test_a_missing_model_is_one_line(tmp_path):
    res = inflight("worker", "--model", str(tmp_path / "nothing"), "--device", "cpu", "--metrics-port", "0")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"inflight worker: error: {tmp_path / 'nothing' / 'config.json'}: not found; "
                                                   "a model directory needs config.json, *.safetensors and tokenizer.json")


def test_serve_with_a_missing_model_is_one_line_before_any_process_starts(tmp_path):
    res = inflight("serve", "--model", str(tmp_path / "nothing"), "--listen", "localhost:0", "--metrics-port", "0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"inflight serve: error: {tmp_path / 'nothing' / 'config.json'}: not found; "
                                               "a model directory needs config.json, *.safetensors and tokenizer.json"]


def test_triton_attention_on_the_cpu_is_refused_by_name():
    res = inflight("generate", "--attention", "triton", "--device", "cpu", "--max-tokens", "2", "hi")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("inflight generate: error: attention=triton runs on CUDA devices")


def test_serve_needs_one_gateway_at_least_and_says_what_several_do():
    res = inflight("serve", "--gateways", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "inflight serve: error: --gateways 0: at least 1 gateway process is needed"
    help_text = " ".join(inflight("serve", "--help").stdout.split())
    assert "--gateways GATEWAYS gateway processes, all on the one --listen port (SO_REUSEPORT" in help_text


def test_serve_runs_a_gateway_per_four_cores_by_default():
    from cli.serve import default_gateways

    assert [default_gateways(n) for n in (None, 1, 2, 7, 8, 16, 64)] == [1, 1, 1, 3, 4, 8, 8]


def test_serve_takes_every_worker_flag_and_passes_on_those_given():
    """`inflight serve --quantization fp8` and the like: serve has the worker's flags but
    those it sets per worker itself (model, device, ids, ports), and hands each worker the
    ones given, as given. tests/test_openai_http.py serves through them."""
    from cli.main import build_parser
    from cli.serve import WORKER_FLAGS_SERVE_SETS
    from inflight.flags import given_argv
    from worker.main import WorkerConfig

    args = build_parser().parse_args(["serve", "--model", "/m", "--quantization", "int8-weight-only", "--max-batch-size", "8",
                                      "--launch-wait", "on", "--kv-cache-tokens-per-block", "16", "--workers", "2"])
    assert given_argv(WorkerConfig, args, WORKER_FLAGS_SERVE_SETS) == [
        "--launch-wait", "true", "--quantization", "int8-weight-only", "--kv-cache-tokens-per-block", "16", "--max-batch-size", "8"]
    res = inflight("serve", "--worker-id", "w")  # serve names its workers itself
    assert res.returncode == 2 and "unrecognized arguments: --worker-id w" in res.stderr
    res = inflight("serve", "--quantization", "int4")
    assert res.returncode == 2 and "argument --quantization: invalid choice: 'int4'" in res.stderr


def test_serve_stops_at_once_when_told_to_while_the_stack_starts():
    """SIGTERM while serve waits for the stack to serve (here it never would: no worker)
    stops it then, not after --ready-timeout."""
    import os
    import signal
    import time

    from testing.stack import count_children, free_port

    cmd = [sys.executable, "-m", "cli", "serve", "--workers", "0", "--listen", f"localhost:{free_port()}", "--http-listen", "",
           "--metrics-port", "0", "--gateway-address", f"tcp://127.0.0.1:{free_port()}", "--worker-address", f"tcp://127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while count_children(proc.pid) < 2 and time.monotonic() < deadline:  # the scheduler and the gateway
            time.sleep(0.1)
        time.sleep(1)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopping" in proc.stderr.read()
        assert len(children) == 2 and not any(os.path.exists(f"/proc/{pid}") for pid in children)
    finally:
        proc.kill()
