"""InferenceServicer: the inflight.v1 gRPC API. Translates protobuf to our own types at
this edge and nowhere else."""

from __future__ import annotations

import asyncio
import hmac
import logging

import grpc
from google.protobuf.message import DecodeError

from gateway import validation
from gateway.request_path import DRAINING, Generation, Prompt, RequestPath
from gateway.stream import GenerateStream, finished_pb, logprobs_pb
from gateway.telemetry import RequestTelemetry
from inflight import errors
from inflight.errors import RequestError, invalid
from inflight.sampling_params import SamplingParams
from inflight.schema import RequestOutput
from inflight.v1 import pb, pb_grpc
from inflight.validation import check_vocab

log = logging.getLogger("inflight.gateway")

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]


def operation(msg) -> str:
    return "chat" if msg.WhichOneof("prompt") == "chat" else "text_completion"


def prompt_of(msg, prefix: str) -> Prompt:
    """A StartRequest's or CompleteRequest's prompt, its field named under `prefix`."""
    kind = msg.WhichOneof("prompt")
    field = f"{prefix}{kind or 'prompt'}"
    if kind == "text":
        if not msg.text:
            raise invalid(field, "must not be empty")
        return Prompt(field, text=validation.prompt_text(msg.text, field))
    if kind == "chat":
        return Prompt(f"{field}.messages", chat=validation.chat_messages(msg.chat, field))
    if kind == "token_ids":
        return Prompt(f"{field}.ids", token_ids=list(msg.token_ids.ids))
    raise invalid(field, "set one of text, chat or token_ids")


class InferenceServicer(pb_grpc.InferenceServicer):
    """The gRPC edge over the RequestPath that the HTTP API shares."""

    def __init__(self, path: RequestPath, max_open_requests_per_stream: int = 1024):
        self.path = path
        self.client = path.client
        self.max_open_requests_per_stream = max_open_requests_per_stream
        self.streams: set[GenerateStream] = set()  # the Generate calls open now

    def _telemetry(self, name: str, msg, context) -> RequestTelemetry:
        traceparent = dict(context.invocation_metadata() or ()).get("traceparent")
        return self.path.telemetry(name, operation(msg), traceparent, "grpc")

    async def _prepare(self, msg, prefix: str, tm: RequestTelemetry) -> tuple[str, list[int], SamplingParams]:
        prompt = prompt_of(msg, prefix)
        params = validation.sampling_params(msg.sampling)
        model, ids = await self.path.prepare(msg.model, prompt, params, tm, f"{prefix}model", f"{prefix}sampling")
        return model, ids, params

    # The API.

    @property
    def draining(self) -> bool:
        return self.path.draining

    def drain(self) -> None:
        """Stop taking requests; each stream ends once its open requests have."""
        self.path.draining = True
        for stream in self.streams:
            stream.drain()

    def in_flight(self) -> int:
        return self.path.in_flight()

    async def Generate(self, request_iterator, context):
        stream = GenerateStream()
        if self.draining:
            stream.drain()
        self.streams.add(stream)

        async def read() -> None:
            failure = None
            try:
                async for req in request_iterator:
                    await stream.room()
                    if isinstance(req, RequestError):  # bytes that did not parse (_parse)
                        failure = (req.code, req.message)
                        break
                    kind = req.WhichOneof("kind")
                    if kind == "start":
                        await self._start(req.start, stream, context)
                    elif kind == "cancel":
                        self._cancel(req.cancel.request_id, stream)
                    else:
                        stream.error("", errors.INVALID_ARGUMENT, "kind: a GenerateRequest needs start or cancel")
            finally:
                stream.reader_done(failure)

        reader = asyncio.create_task(read())
        try:
            while True:
                events = await stream.take()
                if events is None:
                    break
                yield pb.GenerateResponse(events=events)
            if stream.failure:
                await context.abort(grpc.StatusCode[stream.failure[0]], stream.failure[1])
        finally:
            self.streams.discard(stream)
            reader.cancel()
            self.path.abort(stream.open.values(), errors.CANCELLED, "the stream closed")  # closing the stream cancels the rest

    async def _start(self, msg: pb.StartRequest, stream: GenerateStream, context) -> None:
        rid = msg.request_id
        try:
            validation.request_id(rid, "start.request_id")
        except RequestError as e:
            return stream.error("", e.code, e.message)
        if rid in stream.open:
            return stream.error(rid, errors.INVALID_ARGUMENT, f"start.request_id: {rid!r} is already open on this stream",
                                ends_request=False)
        if self.draining:
            return stream.error(rid, errors.UNAVAILABLE, DRAINING)
        if len(stream.open) >= self.max_open_requests_per_stream:
            return stream.error(rid, errors.RESOURCE_EXHAUSTED,
                                f"start: this stream has {len(stream.open)} open requests, the most allowed "
                                f"(--max-open-requests-per-stream {self.max_open_requests_per_stream}); "
                                "wait for one to finish or open another stream")
        tm = self._telemetry("inflight.v1.Inference/Generate", msg, context)
        try:
            model, ids, params = await self._prepare(msg, "start.", tm)
        except RequestError as e:
            tm.end(None, e.code, e.message)
            return stream.error(rid, e.code, e.message)

        def on_output(gen: Generation, out: RequestOutput, text: str) -> None:
            stream.push(rid, out, text, gen.proc)

        stream.open[rid] = self.path.start(model, ids, params, tm, on_output, context.time_remaining())

    def _cancel(self, rid: str, stream: GenerateStream) -> None:
        req = stream.open.get(rid)
        if req is None:  # an id too long to be open is not sent back
            return stream.error(rid if len(rid) <= validation.MAX_REQUEST_ID_CHARS else "", errors.INVALID_ARGUMENT,
                                f"cancel.request_id: no open request {validation.quoted(rid)} on this stream")
        self.path.abort([req], errors.CANCELLED, "cancelled by the client")
        stream.error(rid, errors.CANCELLED, "cancelled by the client")

    async def Complete(self, request: pb.CompleteRequest, context) -> pb.CompleteResponse:
        if self.path.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        tm = self._telemetry("inflight.v1.Inference/Complete", request, context)
        try:
            model, ids, params = await self._prepare(request, "", tm)
        except RequestError as e:
            tm.end(None, e.code, e.message)
            await context.abort(grpc.StatusCode[e.code], e.message)
        done = asyncio.get_running_loop().create_future()
        text: list[str] = []
        tokens: list[int] = []
        lps: list = []

        def on_output(gen: Generation, out: RequestOutput, delta: str) -> None:
            text.append(delta)
            tokens.extend(out.new_token_ids)
            lps.extend(out.logprobs or ())
            if (out.error_code or gen.proc.finish_reason) and not done.done():
                done.set_result(out)

        gen = self.path.start(model, ids, params, tm, on_output, context.time_remaining())
        try:
            last = await done
        finally:
            if not done.done():  # the client went away or its deadline passed
                self.path.abort([gen], errors.CANCELLED, "the call ended before the request")
        if last.error_code:
            await context.abort(grpc.StatusCode[last.error_code], last.error_message or "")
        return pb.CompleteResponse(text="".join(text), token_ids=tokens, finished=finished_pb(gen.proc), logprobs=logprobs_pb(lps))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self.path.check_model_name(request.model)
            kind = request.WhichOneof("input")
            if kind == "text":
                ids = await self.path.encode(validation.prompt_text(request.text, "text"))
            elif kind == "chat":
                ids = await self.path.encode_chat(validation.chat_messages(request.chat, "chat"), "chat.messages")
            else:
                raise invalid("input", "set text or chat")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            self.path.check_model_name(request.model)
            ids = validation.detokenize_ids(request.token_ids, "token_ids")
            check_vocab(ids, self.path.tokenizer.vocab_size, "token_ids")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.DetokenizeResponse(text=await self.path.decode(ids))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.Model(id=m.name, max_seq_len=m.max_seq_len, vocab_size=m.vocab_size, workers=m.workers)
            for m in self.client.models.values()
        ])


class TokenCheck(grpc.aio.ServerInterceptor):
    """Lets an Inference call through only with metadata `authorization: Bearer <token>`
    naming one of `tokens`; anything else is refused with UNAUTHENTICATED before the method
    runs. Health and reflection stay open, so probes need no token."""

    def __init__(self, tokens: list[str]):
        self.tokens = [t.encode() for t in tokens]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE.full_name}/"):
            return handler
        problem = self.problem(dict(details.invocation_metadata or ()).get("authorization"))
        if problem is None:
            return handler  # the method's own handler: nothing added to the call

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        async def refuse_stream(request_iterator, context):  # a stream's handler is a generator, as Generate's is
            # Take the client's first message before refusing: a status sent while the
            # client is still writing it reaches the client as INTERNAL, not as the refusal.
            try:
                await asyncio.wait_for(anext(request_iterator), 1.0)  # a client that sends nothing is not waited for
            except (StopAsyncIteration, asyncio.TimeoutError):
                pass
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            yield  # never reached

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def problem(self, authorization: str | None) -> str | None:
        """Why this `authorization` value is refused; None if it names a token."""
        if authorization is None:
            return "this gateway needs metadata `authorization: Bearer <token>` on every call"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "authorization: expected `Bearer <token>`"
        presented = token.strip().encode()
        matched = False
        for known in self.tokens:  # every one compared, each in constant time
            matched |= hmac.compare_digest(presented, known)
        return None if matched else "authorization: the bearer token is not one this gateway accepts"


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """What pb_grpc.add_InferenceServicer_to_server does, except that bytes which do not
    parse as the method's request are refused with INVALID_ARGUMENT (grpc would answer
    UNKNOWN): they reach the method as a RequestError, which a unary call is aborted
    with here and Generate ends its stream with."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif not method.client_streaming and not method.server_streaming:
            make, behavior = grpc.unary_unary_rpc_method_handler, _refusing_unparsed(behavior)
        else:
            raise NotImplementedError(f"{method.full_name}: only unary and bidirectional methods are served")
        handlers[method.name] = make(behavior, request_deserializer=_parse(request), response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _parse(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return invalid("request", f"not a valid {message_type.DESCRIPTOR.full_name}: {e}")

    return parse


def _refusing_unparsed(behavior):
    async def call(request, context):
        if isinstance(request, RequestError):
            await context.abort(grpc.StatusCode[request.code], request.message)
        return await behavior(request, context)

    return call
