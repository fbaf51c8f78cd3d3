"""InferenceServicer: the inflight.v1 gRPC API. Translates protobuf to our own types at
this edge and nowhere else."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc

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

# Prompts longer than this (characters) are tokenized off the event loop.
OFFLOAD_CHARS = 4096


class OpenRequest:
    __slots__ = ("internal", "telemetry")

    def __init__(self, internal: str, telemetry: RequestTelemetry):
        self.internal = internal
        self.telemetry = telemetry


def operation(msg) -> str:
    return "chat" if msg.WhichOneof("prompt") == "chat" else "text_completion"


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, client: SchedulerClient, tokenizer: TextTokenizer, model_name: str, gateway_id: str, metrics: GatewayMetrics):
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gateway_id = gateway_id
        self.metrics = metrics
        self._ids = itertools.count()
        self.tracing = telemetry.tracing()

    def _telemetry(self, name: str, msg, context) -> RequestTelemetry:
        traceparent = dict(context.invocation_metadata() or ()).get("traceparent")
        return RequestTelemetry(self.metrics, name, traceparent, operation(msg), self.tracing)

    # Shared request preparation.

    def _check_model_name(self, name: str, field: str = "model") -> None:
        if name and name != self.model_name:
            raise RequestError(errors.NOT_FOUND, f"model {name!r} is not served here; this gateway serves {self.model_name!r}", field)

    def _model(self, name: str, field: str = "model") -> schema.ModelInfo:
        self._check_model_name(name, field)
        info = self.client.models.get(self.model_name)
        if info is None:
            raise RequestError(errors.UNAVAILABLE, f"no worker serves model {self.model_name!r} right now")
        return info

    async def _run_tokenizer(self, fn, *args):
        if sum(len(str(a)) for a in args) > OFFLOAD_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)

    async def _prompt_ids(self, msg, oneof: str, prefix: str) -> tuple[list[int], str]:
        """The prompt's token ids, and the field they came from."""
        kind = msg.WhichOneof(oneof)
        field = f"{prefix}{kind or oneof}"
        if kind == "text":
            if not msg.text:
                raise invalid(field, "must not be empty")
            ids = await self._run_tokenizer(self.tokenizer.encode, msg.text)
        elif kind == "chat":
            messages = validation.chat_messages(msg.chat, field)
            ids = await self._run_tokenizer(self.tokenizer.encode_chat, messages)
        elif kind == "token_ids":
            ids, field = list(msg.token_ids.ids), f"{field}.ids"
        else:
            raise invalid(field, "set one of text, chat or token_ids")
        return ids, field

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

    async def Generate(self, request_iterator, context):
        stream = GenerateStream()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    kind = req.WhichOneof("kind")
                    if kind == "start":
                        await self._start(req.start, stream, context)
                    elif kind == "cancel":
                        self._cancel(req.cancel.request_id, stream)
                    else:
                        stream.error("", errors.INVALID_ARGUMENT, "kind: a GenerateRequest needs start or cancel")
            finally:
                stream.reader_done()

        reader = asyncio.create_task(read())
        try:
            while True:
                events = await stream.take()
                if events is None:
                    break
                yield pb.GenerateResponse(events=events)
        finally:
            reader.cancel()
            for req in stream.open.values():  # closing the stream cancels the rest
                req.telemetry.end(None, errors.CANCELLED, "the stream closed")
            self.client.abort([req.internal for req in stream.open.values()])

    async def _start(self, msg: pb.StartRequest, stream: GenerateStream, context) -> None:
        rid = msg.request_id
        if not rid:
            return stream.error("", errors.INVALID_ARGUMENT, "start.request_id: must not be empty")
        if rid in stream.open:
            return stream.error(rid, errors.INVALID_ARGUMENT, f"start.request_id: {rid!r} is already open on this stream",
                                ends_request=False)
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
        if req is None:
            return stream.error(rid, errors.INVALID_ARGUMENT, f"cancel.request_id: no open request {rid!r} on this stream")
        self.client.abort([req.internal])
        req.telemetry.end(None, errors.CANCELLED, "cancelled by the client")
        stream.error(rid, errors.CANCELLED, "cancelled by the client")

    async def Complete(self, request: pb.CompleteRequest, context) -> pb.CompleteResponse:
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
                ids = await self._run_tokenizer(self.tokenizer.encode, request.text)
            elif kind == "chat":
                ids = await self._run_tokenizer(self.tokenizer.encode_chat, validation.chat_messages(request.chat, "chat"))
            else:
                raise invalid("input", "set text or chat")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            self._check_model_name(request.model)
            ids = list(request.token_ids)
            check_vocab(ids, self.tokenizer.vocab_size, "token_ids")
        except RequestError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        return pb.DetokenizeResponse(text=self.tokenizer.decode(ids))

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.Model(id=m.name, max_seq_len=m.max_seq_len, vocab_size=m.vocab_size, workers=m.workers)
            for m in self.client.models.values()
        ])

