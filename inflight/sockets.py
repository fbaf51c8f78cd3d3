"""ZeroMQ as every process uses it: the scheduler's default addresses, the sockets each
side opens, CURVE encryption and authentication for links that cross hosts, and decoding
that logs and drops what is not a message.

CURVE (ZeroMQ's own elliptic-curve encryption): the scheduler holds a key pair and a
folder of the public keys it lets in; each gateway and worker holds its own pair and the
scheduler's public key. Key files are the ones `zmq.auth.create_certificates` writes
(`inflight keys DIR` makes a set). Without keys, links are plaintext, for one host."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

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


@dataclasses.dataclass
class CurveClient:
    """A gateway's or worker's CURVE keys: its own pair, and the scheduler's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: str, server_public_file: str) -> CurveClient | None:
        """None when neither file is named (plaintext); both or neither."""
        if not _curve_on(secret_file, server_public_file, "--curve-secret-key (this process's key pair) and "
                                                          "--curve-server-key (the scheduler's public key)"):
            return None
        public, secret = _load(secret_file, secret=True)
        server_public, _ = _load(server_public_file)
        return cls(public, secret, server_public)


@dataclasses.dataclass
class CurveServer:
    """The scheduler's CURVE keys, and the folder of the public keys it lets in."""

    public: bytes
    secret: bytes
    authorized: Path

    @classmethod
    def load(cls, secret_file: str, authorized_dir: str) -> CurveServer | None:
        if not _curve_on(secret_file, authorized_dir, "--curve-secret-key (the scheduler's key pair) and --curve-authorized-keys "
                                                      "(a folder of the public keys of the gateways and workers let in)"):
            return None
        public, secret = _load(secret_file, secret=True)
        path = Path(authorized_dir)
        if not path.is_dir() or not any(path.glob("*.key")):
            raise SystemExit(f"error: {path}: no public key files (*.key) to authorize gateways and workers with")
        return cls(public, secret, path)

    def start_authenticator(self, ctx: zmq.Context):
        """ZeroMQ's authenticator, on a thread: a peer whose public key is not in the
        folder is refused before any message of its reaches the scheduler."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.authorized))
        return auth


def _curve_on(first: str, second: str, both: str) -> bool:
    """Whether CURVE is on: both settings given. Neither is plaintext; one alone is an error."""
    if not first and not second:
        return False
    if not (first and second):
        raise SystemExit(f"error: CURVE needs both {both}")
    return True


def _load(path: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a readable CURVE key file ({e})") from None
    if secret and not secret_key:
        raise SystemExit(f"error: {path}: holds a public key only; this needs the key pair (the *.key_secret file)")
    return public, secret_key


def dealer(ctx: zmq.Context, identity: str, address: str, curve: CurveClient | None = None) -> zmq.Socket:
    """A gateway's or worker's one socket to the scheduler, addressed by `identity`."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve.public, curve.secret, curve.server_public
    no_drop(sock)
    sock.connect(address)
    return sock


def router(ctx: zmq.Context, address: str, curve: CurveServer | None = None) -> zmq.Socket:
    """One of the scheduler's two bound sockets (gateways, workers). A peer that connects
    again under its identity (a restarted worker, before its old connection is noticed
    gone) takes the identity over instead of being ignored."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_server = curve.public, curve.secret, True
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
