"""InferenceServicer: the inflight.v1 gRPC API. Translates protobuf to our own types at
this edge and nowhere else."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from gateway import validation
from gateway.output import OutputProcessor
from gateway.scheduler_client import SchedulerClient
from gateway.stream import GenerateStream, finished_pb, logprobs_pb
from gateway.telemetry import GatewayMetrics, RequestTelemetry
from gateway.tokenizer import TextTokenizer
from inflight import errors, schema, telemetry
from inflight.errors import RequestError, invalid
from inflight.sampling_params import SamplingParams
from inflight.schema import RequestOutput
from inflight.v1 import pb, pb_grpc
from inflight.validation import check_request, check_vocab

log = logging.getLogger("inflight.gateway")

DRAINING = "this gateway is shutting down and takes no new requests; retry on another"
# Prompts longer than this (characters, or token ids to decode) are tokenized off the event loop.
OFFLOAD_CHARS = 4096
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]


class OpenRequest:
    __slots__ = ("internal", "telemetry")

    def __init__(self, internal: str, telemetry: RequestTelemetry):
        self.internal = internal
        self.telemetry = telemetry


def operation(msg) -> str:
    return "chat" if msg.WhichOneof("prompt") == "chat" else "text_completion"


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, client: SchedulerClient, tokenizer: TextTokenizer, model_name: str, gateway_id: str, metrics: GatewayMetrics,
                 max_open_requests_per_stream: int = 1024):
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.max_open_requests_per_stream = max_open_requests_per_stream
        self.draining = False  # stopping: requests in flight finish, nothing new starts
        self.streams: set[GenerateStream] = set()  # the Generate calls open now
        self._ids = itertools.count()
        self.tracing = telemetry.tracing()

    def _telemetry(self, name: str, msg, context) -> RequestTelemetry:
        traceparent = dict(context.invocation_metadata() or ()).get("traceparent")
        return RequestTelemetry(self.metrics, name, traceparent, operation(msg), self.tracing)

    # Shared request preparation.

    def _check_model_name(self, name: str, field: str = "model") -> None:
        if name and name != self.model_name:
            raise RequestError(errors.NOT_FOUND, f"model {validation.quoted(name)} is not served here; this gateway serves {self.model_name!r}", field)

    def _model(self, name: str, field: str = "model") -> schema.ModelInfo:
        self._check_model_name(name, field)
        info = self.client.models.get(self.model_name)
        if info is None:
            raise RequestError(errors.UNAVAILABLE, f"no worker serves model {self.model_name!r} right now")
        return info

    async def _run_tokenizer(self, size: int, fn, *args):
        """fn(*args), on a thread when `size` (characters or ids) is over OFFLOAD_CHARS."""
        if size > OFFLOAD_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)

    async def _prompt_ids(self, msg, oneof: str, prefix: str) -> tuple[list[int], str]:
        """The prompt's token ids, and the field they came from."""
        kind = msg.WhichOneof(oneof)
        field = f"{prefix}{kind or oneof}"
        if kind == "text":
            if not msg.text:
                raise invalid(field, "must not be empty")
            ids = await self._encode(validation.prompt_text(msg.text, field))
        elif kind == "chat":
            ids = await self._encode_chat(validation.chat_messages(msg.chat, field), field)
        elif kind == "token_ids":
            ids, field = list(msg.token_ids.ids), f"{field}.ids"
        else:
            raise invalid(field, "set one of text, chat or token_ids")
        return ids, field

    async def _encode(self, text: str) -> list[int]:
        return await self._run_tokenizer(len(text), self.tokenizer.encode, text)

    async def _encode_chat(self, messages: list[dict], field: str) -> list[int]:
        size = sum(len(m["content"]) for m in messages)
        return await self._run_tokenizer(size, self.tokenizer.encode_chat, messages, field)

    async def _prepare(self, msg, prefix: str) -> tuple[str, list[int], SamplingParams]:
        info = self._model(msg.model, f"{prefix}model")
        ids, field = await self._prompt_ids(msg, "prompt", prefix)
        params = validation.sampling_params(msg.sampling)
        check_request(ids, params, info.vocab_size, info.max_seq_len, field, f"{prefix}sampling")
        return info.name, ids, params

    def _submit(self, model: str, ids: list[int], params: SamplingParams, context, handler, tm: RequestTelemetry) -> str:
        internal = f"{self.gateway_id}/{next(self._ids)}"
        remaining = context.time_remaining()
        traceparent = tm.submitted(model, len(ids), params.max_tokens, params.temperature)
        self.client.submit(
            schema.Submit(internal, model, ids, params, traceparent=traceparent,
                          deadline=time.time() + remaining if remaining is not None else None),
            handler,
        )
        if remaining is not None:
            # Our own timer: the request ends with DEADLINE_EXCEEDED and leaves the worker
            # whether or not gRPC tells this handler in time.
            asyncio.get_running_loop().call_later(max(0.0, remaining), self._expire, internal, handler)
        return internal

    def _process(self, out: RequestOutput, proc: OutputProcessor, tm: RequestTelemetry) -> str:
        """What every request does with an output: its text, with stop strings applied (a
        matched one aborts the request upstream), and telemetry. Returns the text."""
        text = proc.process(out)
        if proc.matched_stop:
            self.client.abort([out.request_id])
        tm.on_tokens(len(out.new_token_ids))
        if out.error_code:
            tm.end(None, out.error_code, out.error_message or "", proc.prompt_tokens)
        elif proc.finish_reason:
            tm.end(proc.finish_reason, "OK", "", proc.prompt_tokens)
        return text

    def _expire(self, internal: str, handler) -> None:
        if internal not in self.client.handlers:
            return  # already finished
        self.client.abort([internal])
        handler(schema.error_output(internal, errors.DEADLINE_EXCEEDED, "the client's deadline passed"))

    # The API.

    def drain(self) -> None:
        """Stop taking requests; each stream ends once its open requests have."""
        self.draining = True
        for stream in self.streams:
            stream.drain()

    def in_flight(self) -> int:
        return len(self.client.handlers)

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
            for req in stream.open.values():  # closing the stream cancels the rest
                req.telemetry.end(None, errors.CANCELLED, "the stream closed")
            self.client.abort([req.internal for req in stream.open.values()])

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
            with tm.preparing():
                model, ids, params = await self._prepare(msg, "start.")
        except RequestError as e:
            tm.end(None, e.code, e.message)
            return stream.error(rid, e.code, e.message)
        proc = OutputProcessor(self.tokenizer, params.stop)

        def on_output(out: RequestOutput) -> None:
            stream.push(rid, out, self._process(out, proc, tm), proc)

        internal = self._submit(model, ids, params, context, on_output, tm)
        stream.open[rid] = OpenRequest(internal, tm)

    def _cancel(self, rid: str, stream: GenerateStream) -> None:
        req = stream.open.get(rid)
        if req is None:  # an id too long to be open is not sent back
            return stream.error(rid if len(rid) <= validation.MAX_REQUEST_ID_CHARS else "", errors.INVALID_ARGUMENT,
                                f"cancel.request_id: no open request {validation.quoted(rid)} on this stream")
        self.client.abort([req.internal])
        req.telemetry.end(None, errors.CANCELLED, "cancelled by the client")
        stream.error(rid, errors.CANCELLED, "cancelled by the client")

    async def Complete(self, request: pb.CompleteRequest, context) -> pb.CompleteResponse:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        tm = self._telemetry("inflight.v1.Inference/Complete", request, context)
        try:
            with tm.preparing():
                model, ids, params = await self._prepare(request, "")
        except RequestError as e:
            tm.end(None, e.code, e.message)
            await context.abort(grpc.StatusCode[e.code], e.message)
        proc = OutputProcessor(self.tokenizer, params.stop)
        done = asyncio.get_running_loop().create_future()
        text: list[str] = []
        tokens: list[int] = []
        lps: list = []

        def on_output(out: RequestOutput) -> None:
            text.append(self._process(out, proc, tm))
            tokens.extend(out.new_token_ids)
            lps.extend(out.logprobs or ())
            if (out.error_code or proc.finish_reason) and not done.done():
                done.set_result(out)

        internal = self._submit(model, ids, params, context, on_output, tm)
        try:
            last = await done
        finally:
            if not done.done():  # the client went away or its deadline passed
                self.client.abort([internal])
                tm.end(None, errors.CANCELLED, "the call ended before the request")
        if last.error_code:
            await context.abort(grpc.StatusCode[last.error_code], last.error_message or "")
        return pb.CompleteResponse(text="".join(text), token_ids=tokens, finished=finished_pb(proc), logprobs=logprobs_pb(lps))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            self._check_model_name(request.model)
            kind = request.WhichOneof("input")
            if kind == "text":
                ids = await self._encode(validation.prompt_text(request.text, "text"))
            elif kind == "chat":
                ids = await self._encode_chat(validation.chat_messages(request.chat, "chat"), "chat")
            else:
                raise invalid("input", "set text or chat")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            self._check_model_name(request.model)
            ids = validation.detokenize_ids(request.token_ids, "token_ids")
            check_vocab(ids, self.tokenizer.vocab_size, "token_ids")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.DetokenizeResponse(text=await self._run_tokenizer(len(ids), self.tokenizer.decode, ids))

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
