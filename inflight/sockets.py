"""ZeroMQ as every process uses it: the scheduler's default addresses, the sockets each
side opens, and decoding that logs and drops what is not a message."""

from __future__ import annotations

import logging

import msgspec
import zmq

log = logging.getLogger("inflight.sockets")

GATEWAY_ADDRESS = "tcp://127.0.0.1:5557"  # where the scheduler takes gateways
WORKER_ADDRESS = "tcp://127.0.0.1:5558"  # where the scheduler takes workers
# Frames larger than this are refused by ZeroMQ, which drops the peer that sent one. Our
# largest message, a Submit at the longest prompt a model takes (some 10^5 tokens), is
# well under a megabyte.
MAX_FRAME_BYTES = 64 * 2**20


def no_drop(sock: zmq.Socket) -> None:
    """No high-water mark: a ROUTER past it drops messages silently, and a lost token batch
    or terminal event would leave a stream hanging. Memory stays bounded by what the open
    requests produce."""
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def dealer(ctx: zmq.Context, identity: str, address: str) -> zmq.Socket:
    """A gateway's or worker's one socket to the scheduler, addressed by `identity`."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    no_drop(sock)
    sock.connect(address)
    return sock


def router(ctx: zmq.Context, address: str) -> zmq.Socket:
    """One of the scheduler's two bound sockets (gateways, workers). A peer that connects
    again under its identity (a restarted worker, before its old connection is noticed
    gone) takes the identity over instead of being ignored."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    no_drop(sock)
    sock.bind(address)
    return sock


def decode_or_log(decoder: msgspec.msgpack.Decoder, raw: bytes, sender: str):
    """The message in `raw`, or None, logged, when it is not one of ours: a bad frame costs
    a log line, never the process."""
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as e:  # ValidationError (a wrong type) is one too
        log.error("undecodable message from %s: %s", sender, e)
        return None
