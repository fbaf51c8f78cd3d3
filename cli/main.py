"""The `inflight` command: serve the stack, run one of its processes, chat, or generate offline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from inflight.flags import add_config_flags, config_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    from gateway.tokenizer import TextTokenizer
    from inflight.errors import RequestError
    from inflight.sampling_params import SamplingParams
    from worker.embedded.engine import EmbeddedEngine
    from worker.engine_api import EngineConfig

    engine = EmbeddedEngine(config_from_args(EngineConfig, args))
    tok = TextTokenizer.from_dir(engine.model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p) for p in args.prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        outputs = engine.generate(prompts, params)
    except RequestError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {args.prompts[i]!r}")
        print(tok.decode(out))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.main import GatewayConfig, run

    run(config_from_args(GatewayConfig, args))
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from scheduler.config import SchedulerConfig
    from scheduler.main import run

    run(config_from_args(SchedulerConfig, args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import WorkerConfig, run

    run(config_from_args(WorkerConfig, args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cli.serve import WORKER_FLAGS_SERVE_SETS, ServeConfig, run
    from inflight.flags import given_argv
    from worker.main import WorkerConfig

    return run(config_from_args(ServeConfig, args), given_argv(WorkerConfig, args, WORKER_FLAGS_SERVE_SETS))


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ["scheduler", *args.names]:
        if (out / f"{name}.key_secret").exists():
            print(f"inflight keys: error: {out / name}.key_secret exists; not overwriting it", file=sys.stderr)
            return 2
    for name in ["scheduler", *args.names]:
        _, secret = zmq.auth.create_certificates(out, name)
        os.chmod(secret, 0o600)  # a key pair is a secret
    (out / "authorized").mkdir(exist_ok=True)
    for name in args.names:
        (out / "authorized" / f"{name}.key").write_bytes((out / f"{name}.key").read_bytes())
    print(f"key pairs in {out}: scheduler and {', '.join(args.names)}; give each process its *.key_secret, every gateway "
          f"and worker scheduler.key, and the scheduler the folder {out / 'authorized'}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from cli.chat import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from gateway.main import GatewayConfig
    from cli.serve import ServeConfig
    from scheduler.config import SchedulerConfig
    from worker.engine_api import EngineConfig
    from worker.main import WorkerConfig

    parser = argparse.ArgumentParser(prog="inflight", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="run the engine in this process on prompts and print each completion",
                         description="Runs the embedded engine in-process (no servers) and prints each completion in turn.")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt as a user message")
    gen.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 is off (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_config_flags(gen, EngineConfig, "engine")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="start the whole local stack: scheduler, workers, gateways",
                           description="Starts a scheduler, N workers (--workers) and M gateways (--gateways) as child "
                                       "processes, prints where clients connect, restarts a child that dies, and stops them "
                                       "all on Ctrl-C or SIGTERM. Every gateway listens on the one --listen port "
                                       "(SO_REUSEPORT): the kernel hands each new connection to one of them, so clients "
                                       "spread over them by opening several connections (channels).")
    add_config_flags(serve, ServeConfig, "serve")
    from cli.serve import WORKER_FLAGS_SERVE_SETS

    add_config_flags(serve, WorkerConfig, "each worker", exclude=WORKER_FLAGS_SERVE_SETS,
                     description="passed on to every worker (`inflight worker --help` has the same); "
                                 "INFLIGHT_* variables reach the workers too")
    serve.set_defaults(func=cmd_serve)

    for name, cls, func, text in (
        ("gateway", GatewayConfig, cmd_gateway, "run one gateway process (gRPC API)"),
        ("scheduler", SchedulerConfig, cmd_scheduler, "run the scheduler process"),
        ("worker", WorkerConfig, cmd_worker, "run one worker process (one per GPU)"),
    ):
        p = sub.add_parser(name, help=text, description=text + "; every flag also reads an INFLIGHT_* variable.")
        add_config_flags(p, cls, name)
        p.set_defaults(func=func)

    keys = sub.add_parser("keys", help="make CURVE key pairs for scheduler links that cross hosts",
                          description="Writes a key pair for the scheduler and for each NAME (gateways, workers) into DIR, and "
                                      "DIR/authorized with the public keys the scheduler lets in (--curve-authorized-keys).")
    keys.add_argument("dir", metavar="DIR")
    keys.add_argument("names", nargs="*", metavar="NAME", default=["gateway", "worker"],
                      help="one key pair each (default: gateway worker)")
    keys.set_defaults(func=cmd_keys)

    chat = sub.add_parser("chat", help="send a prompt to a running gateway and stream the reply",
                          description="Sends PROMPT as a user chat message and prints the reply as it arrives.")
    chat.add_argument("prompt", metavar="PROMPT")
    chat.add_argument("--target", default="localhost:50051", help="gateway host:port (default: localhost:50051)")
    chat.add_argument("--model", default="", help="model name (default: the gateway's)")
    chat.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    chat.add_argument("--system", default="", help="a system message to send first")
    from cli.chat import add_connection_flags

    add_connection_flags(chat)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.errors import ModelError
    from worker.engine_api import EngineConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelError, EngineConfigError) as e:  # a model or a setting that cannot be used: one line, no traceback
        print(f"inflight {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
