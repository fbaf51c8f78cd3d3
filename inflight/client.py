"""A small asyncio client for internal services.

    async with Client("localhost:50051") as client:
        async for delta in client.generate(chat=[{"role": "user", "content": "Hi"}], max_tokens=64):
            print(delta.text, end="")

`Client.session()` opens one Generate stream that multiplexes many requests. Against a
gateway with TLS, mutual TLS and a token:

    Client("gateway.internal:50051", root_ca="ca.pem", cert="me.pem", key="me.key", token=token)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import grpc

from inflight.v1 import pb, pb_grpc


class GenerationError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


def start_request(request_id: str, *, text: str | None = None, chat: list[dict] | None = None,
                  token_ids: list[int] | None = None, model: str = "", **sampling) -> pb.StartRequest:
    """A StartRequest from keyword arguments (sampling fields as in SamplingParams)."""
    msg = pb.StartRequest(request_id=request_id, model=model, sampling=pb.SamplingParams(**sampling))
    if text is not None:
        msg.text = text
    elif chat is not None:
        msg.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat]))
    elif token_ids is not None:
        msg.token_ids.CopyFrom(pb.TokenIds(ids=token_ids))
    return msg


class Session:
    """One Generate stream: start and cancel requests, iterate over server events."""

    def __init__(self, stub: pb_grpc.InferenceStub, metadata=None):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._call = stub.Generate(self._requests(), metadata=metadata)

    async def _requests(self):
        while True:
            msg = await self._outbox.get()
            if msg is None:
                return
            yield msg

    def start(self, request_id: str, **kwargs) -> None:
        self._outbox.put_nowait(pb.GenerateRequest(start=start_request(request_id, **kwargs)))

    def cancel(self, request_id: str) -> None:
        self._outbox.put_nowait(pb.GenerateRequest(cancel=pb.CancelRequest(request_id=request_id)))

    def close(self) -> None:
        """No more requests; the server ends the stream once the open ones finish."""
        self._outbox.put_nowait(None)

    def abort(self) -> None:
        """Drop the stream: the server cancels everything still open on it."""
        self._call.cancel()

    async def events(self) -> AsyncIterator[pb.Event]:
        async for response in self._call:
            for event in response.events:
                yield event


def channel_credentials(root_ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS that trusts the PEM CA file `root_ca` (gRPC's own roots if None), presenting the
    client certificate `cert` with its `key` when the gateway asks for one (mutual TLS)."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(root_certificates=_read(root_ca), private_key=_read(key), certificate_chain=_read(cert))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class Client:
    """A channel to one gateway: plaintext unless `tls` or any of `root_ca`, `cert`, `key`
    (PEM file paths) is given; `token` is sent as `authorization: Bearer <token>`.
    `options` are gRPC channel arguments: `[("grpc.use_local_subchannel_pool", 1)]` gives
    the channel a connection of its own (grpc shares one between a process's channels to
    the same target), which reaches whichever gateway process the kernel picks."""

    def __init__(self, target: str = "localhost:50051", metadata: list[tuple[str, str]] | None = None, *, tls: bool = False,
                 root_ca: str | None = None, cert: str | None = None, key: str | None = None, token: str | None = None,
                 options: list[tuple[str, object]] | None = None):
        if tls or root_ca or cert or key:
            self.channel = grpc.aio.secure_channel(target, channel_credentials(root_ca, cert, key), options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = [*(metadata or ()), ("authorization", f"Bearer {token}")] if token else metadata

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    def session(self, metadata: list[tuple[str, str]] | None = None) -> Session:
        """A new Generate stream; `metadata` is added to the client's for this stream
        alone (a `traceparent`, say, to make its requests part of the caller's trace)."""
        return Session(self.stub, [*(self.metadata or ()), *metadata] if metadata else self.metadata)

    async def generate(self, **kwargs) -> AsyncIterator[pb.Delta]:
        """Stream one request's deltas; raises GenerationError if it fails. The last
        value yielded is the Finished message."""
        session = self.session()
        session.start("0", **kwargs)
        session.close()
        async for event in session.events():
            kind = event.WhichOneof("kind")
            if kind == "delta":
                yield event.delta
            elif kind == "finished":
                yield event.finished
                return
            else:
                raise GenerationError(_code(event.error.code), event.error.message)

    async def complete(self, *, text=None, chat=None, token_ids=None, model: str = "", **sampling) -> pb.CompleteResponse:
        req = pb.CompleteRequest(model=model, sampling=pb.SamplingParams(**sampling))
        start = start_request("", text=text, chat=chat, token_ids=token_ids)
        if start.HasField("chat"):
            req.chat.CopyFrom(start.chat)
        elif start.HasField("token_ids"):
            req.token_ids.CopyFrom(start.token_ids)
        elif text is not None:
            req.text = text
        return await self.stub.Complete(req, metadata=self.metadata)
