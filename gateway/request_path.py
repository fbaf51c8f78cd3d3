"""RequestPath: what the gateway does with a request, whichever protocol brought it (gRPC
in servicer.py, the OpenAI HTTP API in openai_api.py): the model it names, its prompt to
token ids (chat template; long prompts tokenized off the loop), the shared validator, the
submit to the scheduler with trace context and a deadline, each output to text
(incremental detokenizer, stop strings: a match aborts the request upstream), metrics,
and aborts. The protocols translate to and from these types at their edge and nowhere else."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Callable

from gateway.output import OutputProcessor
from gateway.scheduler_client import SchedulerClient
from gateway.telemetry import GatewayMetrics, RequestTelemetry
from gateway.tokenizer import TextTokenizer
from gateway.validation import quoted
from inflight import errors, schema, telemetry
from inflight.errors import RequestError
from inflight.sampling_params import SamplingParams
from inflight.schema import RequestOutput
from inflight.validation import check_request

DRAINING = "this gateway is shutting down and takes no new requests; retry on another"
# Prompts longer than this (characters, or token ids to decode) are tokenized off the event loop.
OFFLOAD_CHARS = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the client sent it: text, chat messages ({"role", "content"}) or token
    ids; `field` names it in errors as the client's protocol does ("start.text", "messages")."""

    field: str
    text: str | None = None
    chat: list[dict] | None = None
    token_ids: list[int] | None = None


class Generation:
    """One request submitted to the scheduler: its id there, its text so far, its telemetry."""

    __slots__ = ("internal", "proc", "telemetry")

    def __init__(self, internal: str, proc: OutputProcessor, tm: RequestTelemetry):
        self.internal, self.proc, self.telemetry = internal, proc, tm


# Called with each output of a request and the text it added (stop strings applied).
OnOutput = Callable[[Generation, RequestOutput, str], None]


class RequestPath:
    def __init__(self, client: SchedulerClient, tokenizer: TextTokenizer, model_name: str, gateway_id: str, metrics: GatewayMetrics):
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.draining = False  # stopping: requests in flight finish, nothing new starts
        self._ids = itertools.count()
        self.tracing = telemetry.tracing()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise RequestError(errors.UNAVAILABLE, DRAINING)

    def in_flight(self) -> int:
        return len(self.client.handlers)

    def check_model_name(self, name: str, field: str = "model") -> None:
        if name and name != self.model_name:
            raise RequestError(errors.NOT_FOUND, f"model {quoted(name)} is not served here; this gateway serves {self.model_name!r}", field)

    def model(self, name: str, field: str = "model") -> schema.ModelInfo:
        self.check_model_name(name, field)
        info = self.client.models.get(self.model_name)
        if info is None:
            raise RequestError(errors.UNAVAILABLE, f"no worker serves model {self.model_name!r} right now")
        return info

    async def _run_tokenizer(self, size: int, fn, *args):
        """fn(*args), on a thread when `size` (characters or ids) is over OFFLOAD_CHARS."""
        if size > OFFLOAD_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)

    async def encode(self, text: str) -> list[int]:
        return await self._run_tokenizer(len(text), self.tokenizer.encode, text)

    async def encode_chat(self, messages: list[dict], field: str) -> list[int]:
        size = sum(len(m["content"]) for m in messages)
        return await self._run_tokenizer(size, self.tokenizer.encode_chat, messages, field)

    async def decode(self, ids: list[int]) -> str:
        return await self._run_tokenizer(len(ids), self.tokenizer.decode, ids)

    async def token_ids(self, prompt: Prompt) -> list[int]:
        if prompt.text is not None:
            return await self.encode(prompt.text)
        if prompt.chat is not None:
            return await self.encode_chat(prompt.chat, prompt.field)
        return prompt.token_ids

    def telemetry(self, name: str, operation: str, traceparent: str | None, protocol: str) -> RequestTelemetry:
        return RequestTelemetry(self.metrics, name, traceparent, operation, self.tracing, protocol)

    async def prepare(self, model: str, prompt: Prompt, params: SamplingParams, tm: RequestTelemetry,
                      model_field: str = "model", sampling_field: str = "") -> tuple[str, list[int]]:
        """The model's name and the prompt's token ids, every check passed (RequestError if not)."""
        with tm.preparing():
            info = self.model(model, model_field)
            ids = await self.token_ids(prompt)
            check_request(ids, params, info.vocab_size, info.max_seq_len, prompt.field, sampling_field)
        return info.name, ids

    def start(self, model: str, ids: list[int], params: SamplingParams, tm: RequestTelemetry, on_output: OnOutput,
              timeout: float | None = None) -> Generation:
        """Submits the request; `on_output` gets each output. `timeout` (seconds): past it the
        request ends with DEADLINE_EXCEEDED and leaves the worker."""
        internal = f"{self.gateway_id}/{next(self._ids)}"
        gen = Generation(internal, OutputProcessor(self.tokenizer, params.stop), tm)

        def handler(out: RequestOutput) -> None:
            on_output(gen, out, self._process(gen, out))

        traceparent = tm.submitted(model, len(ids), params.max_tokens, params.temperature)
        self.client.submit(schema.Submit(internal, model, ids, params, traceparent=traceparent,
                                         deadline=time.time() + timeout if timeout is not None else None), handler)
        if timeout is not None:
            # Our own timer: the request ends and leaves the worker whether or not the
            # protocol's own deadline handling reaches the handler in time.
            asyncio.get_running_loop().call_later(max(0.0, timeout), self._expire, internal, handler)
        return gen

    def abort(self, gens, code: str = errors.CANCELLED, message: str = "cancelled by the client") -> None:
        """Ends these requests here (their telemetry with `code`) and on their workers, in one
        message; those already ended are left as they are."""
        gens = list(gens)
        for gen in gens:
            if gen.internal in self.client.handlers:
                gen.telemetry.end(None, code, message)
        self.client.abort([gen.internal for gen in gens])

    def _process(self, gen: Generation, out: RequestOutput) -> str:
        proc, tm = gen.proc, gen.telemetry
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
