"""`inflight chat`: stream one chat reply from a running gateway to the terminal."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from inflight.client import Client, GenerationError
from inflight.v1 import pb


async def _chat(args) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    metadata = [("traceparent", os.environ["TRACEPARENT"])] if os.environ.get("TRACEPARENT") else None
    async with Client(args.target, metadata) as client:
        try:
            async for part in client.generate(chat=messages, model=args.model, max_tokens=args.max_tokens, temperature=args.temperature):
                if isinstance(part, pb.Delta):
                    sys.stdout.write(part.text)
                    sys.stdout.flush()
        except GenerationError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: cannot reach a gateway at {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print()
    return 0


def run(args) -> int:
    return asyncio.run(_chat(args))
