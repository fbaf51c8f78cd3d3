"""The OpenAI HTTP API (server-sent events) against gRPC on the same stack: streamed tokens
per second and time to first token at 1, 64 and 256 concurrent streams.

One stack (`inflight serve`, one gateway process serving both protocols). Each stream
sends its next request when the last one finished (closed loop), the same text prompt and
`max_tokens` output tokens (`ignore_eos`) over both: gRPC a Generate stream per request
(bench.load, as bench.serving_path measures it), HTTP a keep-alive connection per stream
posting /v1/completions with `stream: true` (a raw asyncio client that reads the chunked
SSE body, so that the load generator costs little next to the gateway). The points
alternate between the protocols, each measured from load processes of its own.

    python -m bench.http_vs_grpc --seconds 10 --out http_vs_grpc.json                      # engine double, CPU
    python -m bench.http_vs_grpc --shape llama-3.2-1b --vocab 49152 --device cuda ...      # the embedded engine on a GPU

By default the worker runs the model-free engine double (testing/engine_double.py), so
the numbers are the serving path's ceiling per protocol; `--step-ms` gives each step a
GPU-like duration; `--shape` (random weights of that shape, bench/shapes.py) or `--model`
runs the embedded engine instead."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time

from bench.load import PROMPT, Target, percentile, run_load, spawn
from bench.shapes import SHAPES, make_model_dir
from bench.stack_cpu import stack_cpu
from testing.stack import Stack


def start_stack(step_ms: float, model: str | None, device: str) -> Stack:
    env = {"INFLIGHT_MAX_BATCH_SIZE": "512"}
    if model is None:
        env.update({"INFLIGHT_ENGINE": "testing.engine_double:InstantEngine", "INFLIGHT_SERVED_MODEL_NAME": "bench",
                    "ENGINE_DOUBLE_STEP_MS": str(step_ms)})
    return Stack(env=env, model=os.path.abspath(model) if model else None, device=device, host="127.0.0.1", metrics=False,
                 tokens_per_block=None, timeout=900)


# The HTTP load: SSE over keep-alive connections, one request at a time on each.

def _http_process(host, port, model, streams, seconds, max_tokens, results, go, start) -> None:
    import uvloop

    results.put(uvloop.run(_http_streams(host, port, model, streams, seconds, max_tokens, results, go, start)))


async def _http_streams(host, port, model, streams, seconds, max_tokens, results, go, start) -> dict:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    conns = [await asyncio.open_connection(host, port) for _ in range(streams)]
    results.put("ready")
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    t0 = start.value
    while time.perf_counter() < t0:
        await asyncio.sleep(t0 - time.perf_counter())
    cpu0 = time.process_time()
    records, counts = [], {"tokens": 0, "messages": 0}

    async def one(reader, writer) -> None:
        while time.perf_counter() < t0 + seconds:
            sent = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP load: {status!r}")
            while await reader.readline() != b"\r\n":  # headers (transfer-encoding: chunked)
                pass
            first, last = None, b""
            while True:  # the body's chunks: one per write of the gateway
                size = int((await reader.readline()).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                first = first or time.perf_counter()
                counts["messages"] += 1
                last = data[:-2]
            events = [e for e in last.split(b"\n\n") if e]
            usage = json.loads(events[-2][len(b"data: "):])["usage"]  # before [DONE]
            counts["tokens"] += usage["completion_tokens"]
            records.append((first - sent, time.perf_counter() - sent, usage["completion_tokens"]))

    await asyncio.gather(*(one(r, w) for r, w in conns))
    elapsed = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    return {**counts, "seconds": elapsed, "records": records, "cpu_s": time.process_time() - cpu0}


def run_http(address: str, model: str, concurrency: int, seconds: float, max_tokens: int, procs: int) -> dict:
    host, port = address.rsplit(":", 1)
    go, start, results = spawn.Event(), spawn.Value("d", 0.0), spawn.Queue()
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    ps = [spawn.Process(target=_http_process, args=(host, int(port), model, n, seconds, max_tokens, results, go, start))
          for n in shares if n]
    for p in ps:
        p.start()
    for _ in ps:
        assert results.get(timeout=120) == "ready"
    start.value = time.perf_counter() + 0.05
    go.set()
    got = [results.get(timeout=seconds + 300) for _ in ps]
    for p in ps:
        p.join()
    return {"tokens": sum(g["tokens"] for g in got), "messages": sum(g["messages"] for g in got),
            "seconds": max(g["seconds"] for g in got), "records": [r for g in got for r in g["records"]],
            "load_util": [round(g["cpu_s"] / g["seconds"], 3) for g in got]}


def point(got: dict, cpu: dict[str, float]) -> dict:
    ttfts = sorted(r[0] for r in got["records"] if r[0] is not None)
    tokens, elapsed = got["tokens"], got["seconds"]
    return {"tokens_per_s": tokens / elapsed, "messages_per_s": got["messages"] / elapsed, "requests": len(got["records"]),
            "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None, "ttft_p90_ms": percentile(ttfts, 90) if ttfts else None,
            "gateway_cpu_ms_per_1k_tokens": 1e6 * cpu.get("gateway", 0.0) / tokens if tokens else None,
            "load_util": got["load_util"]}


def measure(stack: Stack, protocol: str, model: str, concurrency: int, seconds: float, max_tokens: int, procs: int) -> dict:
    before = stack_cpu(stack.proc.pid)
    if protocol == "grpc":
        got = run_load({"": Target(stack.target, None, procs)}, concurrency, seconds=seconds, max_tokens=max_tokens, model=model)[""]
    else:
        got = run_http(stack.http_target, model, concurrency, seconds, max_tokens, procs)
    after = stack_cpu(stack.proc.pid)
    return point(got, {k: v - before.get(k, 0.0) for k, v in after.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=0.0, help="engine double: each step takes this long (0: instant)")
    ap.add_argument("--model", help="run the embedded engine on this model directory instead of the engine double")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="run the embedded engine on random weights of this shape (the built-in tokenizer)")
    ap.add_argument("--vocab", type=int, help="with --shape: the vocabulary size instead of the shape's, to fit the tokenizer (49152)")
    ap.add_argument("--device", default="cpu", help="with --model: cpu or cuda")
    ap.add_argument("--rounds", type=int, default=1, help="measure every point this many times, alternating which protocol goes first")
    ap.add_argument("--streams-per-load-process", type=int, default=128)
    ap.add_argument("--out", default="http_vs_grpc.json")
    args = ap.parse_args()
    if args.shape:
        from models.gguf_convert import default_model_dir

        args.model = str(make_model_dir(args.shape, default_model_dir(), args.vocab))
    model = "bench" if args.model is None else ""
    stack = start_stack(args.step_ms, args.model, args.device)
    if not model:
        from models.config import served_model_name

        model = served_model_name(args.model)
    rows = []
    try:
        for c in args.concurrency:
            procs = -(-c // args.streams_per_load_process)
            for r in range(args.rounds):
                order = ("grpc", "http") if r % 2 == 0 else ("http", "grpc")
                got = {p: measure(stack, p, model, c, args.seconds, args.max_tokens, procs) for p in order}
                rows.append({"concurrency": c, "round": r, **got, "ratio": got["http"]["tokens_per_s"] / got["grpc"]["tokens_per_s"]})
    finally:
        stack.stop()
        if args.shape:
            shutil.rmtree(os.path.dirname(args.model), ignore_errors=True)
    engine = f"model {args.model} on {args.device}" if args.model else f"engine double ({args.step_ms:g} ms steps)"
    print(f"\nHTTP/SSE against gRPC, one gateway process, {engine}, {args.max_tokens} tokens per request, "
          f"{args.seconds:.0f}s per point, {os.cpu_count()} cores")
    print(f"{'streams':>7} | {'gRPC tok/s':>10} {'TTFT p50':>8} {'p90 ms':>7} {'gw ms/1k':>8} | {'HTTP tok/s':>10} {'TTFT p50':>8} "
          f"{'p90 ms':>7} {'gw ms/1k':>8} | {'HTTP/gRPC':>9}")
    for row in rows:
        g, h = row["grpc"], row["http"]
        cells = lambda x: f"{x['tokens_per_s']:>10.0f} {x['ttft_p50_ms']:>8.1f} {x['ttft_p90_ms']:>7.1f} {x['gateway_cpu_ms_per_1k_tokens']:>8.1f}"  # noqa: E731
        print(f"{row['concurrency']:>7} | {cells(g)} | {cells(h)} | {row['ratio']:>9.3f}")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
