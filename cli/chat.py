"""`inflight chat`: stream one chat reply from a running gateway to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc

from inflight.client import Client, GenerationError
from inflight.v1 import pb


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """How chat reaches a gateway with TLS, mutual TLS or a bearer token."""
    parser.add_argument("--tls", action="store_true", help="TLS, trusting gRPC's default root certificates (implied by --tls-ca)")
    parser.add_argument("--tls-ca", default="", help="PEM CA certificates to trust for the gateway's certificate")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for a gateway with mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--auth-token-file", default="", help="file whose first line is the bearer token to send")


def _token(path: str) -> str | None:
    if not path:
        return None
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--auth-token-file {path}: no token in it")
    return lines[0]


async def _chat(args) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    metadata = [("traceparent", os.environ["TRACEPARENT"])] if os.environ.get("TRACEPARENT") else None
    try:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        client = Client(args.target, metadata, tls=args.tls, root_ca=args.tls_ca or None, cert=args.tls_cert or None,
                        key=args.tls_key or None, token=_token(args.auth_token_file))
    except (OSError, ValueError) as e:
        print(f"inflight chat: error: {f'{e.filename}: {e.strerror}' if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    async with client:
        try:
            async for part in client.generate(chat=messages, model=args.model, max_tokens=args.max_tokens, temperature=args.temperature):
                if isinstance(part, pb.Delta):
                    sys.stdout.write(part.text)
                    sys.stdout.flush()
        except GenerationError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as e:
            where = "cannot reach a gateway at" if e.code() == grpc.StatusCode.UNAVAILABLE else "the gateway at"
            print(f"\nerror: {where} {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print()
    return 0


def run(args) -> int:
    return asyncio.run(_chat(args))
