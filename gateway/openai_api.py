"""The OpenAI-compatible HTTP API (POST /v1/chat/completions, POST /v1/completions, GET
/v1/models), streamed as server-sent events: a thin adapter over the RequestPath that gRPC
uses (validation, chat template, detokenizer, stop strings, metrics labelled "http").
Starlette routes it; uvicorn serves it on the gateway's own event loop beside grpc.aio,
on a socket with SO_REUSEPORT so that `inflight serve --gateways N` shares its port too.

A client that goes away (the connection closes) has its requests aborted at once, not at
their next token: every response watches for the disconnect while it waits or streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from functools import partial
from typing import Callable

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import openai_protocol as oa
from gateway.request_path import Generation, RequestPath
from inflight import errors
from inflight.errors import RequestError
from inflight.schema import RequestOutput

log = logging.getLogger("inflight.gateway")

JSON = "application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # proxies (nginx) pass events on as they come
DONE = b"data: [DONE]\n\n"


class Choices:
    """One HTTP request's generations (n per prompt) and the outputs not yet written."""

    def __init__(self, path: RequestPath, req: oa.CompletionRequest, model: str):
        self.path, self.req, self.model = path, req, model
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        count = len(req.prompts) * req.n
        self.gens: list[Generation | None] = [None] * count
        self.texts: list[list[str]] = [[] for _ in range(count)]  # a whole (not streamed) response's text
        self.logprobs: list[list] = [[] for _ in range(count)]
        self.token_chars = [0] * count  # a streamed choice's tokens' characters so far (text_offset)
        self.pending: list[tuple[int, RequestOutput, str]] = []
        self.open = count
        self.error: tuple[str, str] | None = None  # the first choice's failure ends the response
        self.disconnected = False
        self.wake = asyncio.Event()

    def on_output(self, index: int, gen: Generation, out: RequestOutput, text: str) -> None:
        self.pending.append((index, out, text))
        if out.error_code or gen.proc.finish_reason:
            self.open -= 1
            if out.error_code and self.error is None:
                self.error = (out.error_code, out.error_message or "")
                self.path.abort([g for g in self.gens if g is not None], errors.CANCELLED, "another choice of the request failed")
        self.wake.set()

    def disconnect(self) -> None:
        self.disconnected = True
        self.path.abort([g for g in self.gens if g is not None], errors.CANCELLED, "the client disconnected")
        self.wake.set()

    @property
    def done(self) -> bool:
        return self.open <= 0 or self.error is not None or self.disconnected

    async def settled(self) -> None:
        """Returns once there are outputs to write or nothing more will come."""
        while not self.pending and not self.done:
            self.wake.clear()
            await self.wake.wait()

    def take(self) -> list[tuple[int, RequestOutput, str]]:
        items, self.pending = self.pending, []
        return items

    # Logprobs as the OpenAI API shapes them.

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.path.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", "replace"), list(raw)

    def chat_logprobs(self, lps) -> list[dict]:
        top_n = self.req.top_logprobs
        out = []
        for lp in lps:
            token, raw = self._token(lp.token_id)
            top = []
            for t, v in lp.top[:top_n]:
                tt, tr = self._token(t)
                top.append({"token": tt, "logprob": v, "bytes": tr})
            out.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return out

    def completion_logprobs(self, lps, offset: int) -> dict:
        top_n = self.req.top_logprobs
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            token = self._token(lp.token_id)[0]
            tokens.append(token)
            values.append(lp.logprob)
            tops.append({self._token(t)[0]: v for t, v in lp.top[:top_n]})
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def usage(self) -> dict:
        procs = [g.proc for g in self.gens if g is not None]
        prompt = sum(procs[p * self.req.n].prompt_tokens for p in range(len(self.req.prompts)) if p * self.req.n < len(procs))
        cached = sum(procs[p * self.req.n].cached_tokens for p in range(len(self.req.prompts)) if p * self.req.n < len(procs))
        return oa.usage(prompt, sum(p.completion_tokens for p in procs), cached)

    # Stream chunks.

    def _chunk(self, choice: dict, usage=False) -> bytes:
        body = {"id": self.id, "object": self.object + (".chunk" if self.req.chat else ""), "created": self.created,
                "model": self.model, "choices": [choice] if choice else []}
        if self.req.include_usage:
            body["usage"] = self.usage() if usage else None
        return b"data: " + msgspec.json.encode(body) + b"\n\n"

    def first_chunks(self) -> bytes:
        """Chat streams open each choice with its role, as OpenAI's do."""
        if not self.req.chat:
            return b""
        return b"".join(self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                        for i in range(len(self.gens)))

    def chunks(self, items: list[tuple[int, RequestOutput, str]]) -> bytes:
        """The items as one chunk per choice (outputs that piled up while the client was slow
        merged into one), in the order the choices first appear."""
        merged: dict[int, list] = {}
        for index, out, text in items:
            m = merged.setdefault(index, [[], [], None])
            m[0].append(text)
            if out.logprobs:
                m[1].extend(out.logprobs)
            if out.error_code is None:  # a finished choice's last output is in this batch: none come after it
                m[2] = self.gens[index].proc.finish_reason
        parts = []
        for index, (texts, lps, reason) in merged.items():
            text = "".join(texts)
            if not text and not lps and reason is None:
                continue
            lp = None
            if self.req.logprobs:
                if self.req.chat:
                    lp = {"content": self.chat_logprobs(lps)}
                else:
                    # Offsets count the tokens' own text: with stop strings, text that might
                    # begin one is held back, so the text sent so far can trail the tokens.
                    lp = self.completion_logprobs(lps, self.token_chars[index])
                    self.token_chars[index] += sum(map(len, lp["tokens"]))
            if self.req.chat:
                choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
            parts.append(self._chunk(choice))
        return b"".join(parts)

    def tail(self) -> bytes:
        """What ends a stream: an error event if a choice failed, the usage chunk if asked, [DONE]."""
        out = b""
        if self.error is not None:
            status, body = oa.error_body(*self.error)
            out += b"data: " + body + b"\n\n"
        elif self.req.include_usage:
            out += self._chunk({}, usage=True)
        return out + DONE

    # A whole response.

    def collect(self, items) -> None:
        for index, out, text in items:
            self.texts[index].append(text)
            if out.logprobs:
                self.logprobs[index].extend(out.logprobs)

    def whole(self) -> dict:
        choices = []
        for index, gen in enumerate(self.gens):
            text = "".join(self.texts[index])
            lp = None
            if self.req.logprobs:
                lps = self.logprobs[index]
                lp = {"content": self.chat_logprobs(lps)} if self.req.chat else self.completion_logprobs(lps, 0)
            if self.req.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": gen.proc.finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": gen.proc.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}


async def _disconnected(receive) -> None:
    """Returns when the client's connection closes (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CompletionResponse(Response):
    """Streams the choices as server-sent events, or waits for them and answers in one JSON
    body; either way, a disconnect aborts the requests at once."""

    def __init__(self, choices: Choices):
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        c = self.choices
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(lambda t: None if t.cancelled() or c.done else c.disconnect())
        try:
            if c.req.stream:
                await self._stream(send)
            else:
                await self._whole(send)
        finally:
            watcher.cancel()
            if not c.done:  # the response failed to go out
                c.disconnect()

    async def _stream(self, send) -> None:
        c = self.choices
        # The headers wait for the first output: a request refused before any token (queue
        # full, no worker) gets its own status (429, 503), as a whole response would.
        await c.settled()
        if c.disconnected:
            return
        if c.error is not None and not any(out.new_token_ids for _, out, _ in c.pending):
            await _send_json(send, *oa.error_body(*c.error))
            return
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        first = c.first_chunks()
        while True:
            await c.settled()
            if c.disconnected:
                return
            body = first + c.chunks(c.take())
            first = b""
            if c.done:
                await send({"type": "http.response.body", "body": body + c.tail(), "more_body": False})
                return
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _whole(self, send) -> None:
        c = self.choices
        while True:
            await c.settled()
            c.collect(c.take())
            if c.done:
                break
        if c.disconnected:
            return
        if c.error is not None:
            status, body = oa.error_body(*c.error)
        else:
            status, body = 200, msgspec.json.encode(c.whole())
        await _send_json(send, status, body)


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def json_response(status: int, body: bytes) -> Response:
    return Response(body, status, media_type=JSON)


def error_response(e: RequestError) -> Response:
    return json_response(*oa.request_error_body(e))


class OpenAIApi:
    """The routes. `auth(header)` says why an Authorization header is refused (None: let in),
    the gRPC port's bearer-token check; None means no tokens are asked for."""

    def __init__(self, path: RequestPath, max_body_bytes: int, auth: Callable[[str | None], str | None] | None = None):
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", partial(self.create, chat=True), methods=["POST"]),
            Route("/v1/completions", partial(self.create, chat=False), methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    @staticmethod
    async def _internal_error(request: Request, exc: Exception) -> Response:
        """A bug's answer in the API's error shape, not Starlette's plain-text 500."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return json_response(*oa.error_body(errors.INTERNAL, f"{request.method} {request.url.path}: internal error"))

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.url.path}; this server has POST /v1/chat/completions, POST /v1/completions and GET /v1/models"
        else:
            message = f"{request.method} {request.url.path}: {exc.detail}"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = msgspec.json.encode({"error": {"message": message, "type": kind, "param": None, "code": None}})
        return Response(body, exc.status_code, media_type=JSON, headers=getattr(exc, "headers", None))

    def _refused(self, request: Request) -> Response | None:
        if self.auth is None:
            return None
        header = request.headers.get("authorization")
        problem = self.auth(header)
        if problem is None:
            return None
        if header is None:
            problem = "this gateway needs the header `Authorization: Bearer <token>` (the openai client's api_key)"
        return json_response(*oa.error_body("UNAUTHENTICATED", problem))

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _TooLarge(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge(size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def create(self, request: Request, chat: bool) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            self.path.refuse_if_draining()
            req = oa.parse_request(oa.parse_json(await self._body(request)), chat)
        except RequestError as e:
            return error_response(e)
        except _TooLarge as e:
            body = msgspec.json.encode({"error": {"message": f"the request body has {e.size} bytes or more; at most {self.max_body_bytes} "
                                                             "(--max-receive-message-bytes)", "type": "invalid_request_error",
                                                  "param": None, "code": "request_too_large"}})
            return json_response(413, body)
        except ClientDisconnect:
            return Response(status_code=499)
        name = "POST /v1/chat/completions" if chat else "POST /v1/completions"
        traceparent = request.headers.get("traceparent")
        tms = [self.path.telemetry(name, "chat" if chat else "text_completion", traceparent, "http")
               for _ in range(len(req.prompts) * req.n)]
        prepared = []
        try:
            for p, prompt in enumerate(req.prompts):
                prepared.append(await self.path.prepare(req.model, prompt, req.params, tms[p * req.n]))
        except RequestError as e:
            e = req.client_error(e)
            for tm in tms:
                tm.end(None, e.code, e.message)
            return error_response(e)
        choices = Choices(self.path, req, prepared[0][0])
        try:
            for p, (model, ids) in enumerate(prepared):
                for i in range(req.n):
                    index = p * req.n + i
                    params = req.params
                    if i and params.seed is not None:  # each choice its own sample of the same seeded request
                        params = msgspec.structs.replace(params, seed=(params.seed + i) % 2**63)
                    choices.gens[index] = self.path.start(model, ids, params, tms[index], partial(choices.on_output, index))
        except Exception:  # the choices already started end too: nobody would read them
            log.exception("starting an HTTP request's generations failed")
            started = [g for g in choices.gens if g is not None]
            self.path.abort(started, errors.INTERNAL, "the gateway failed to start this request")
            for tm in tms[len(started):]:
                tm.end(None, errors.INTERNAL, "the gateway failed to start this request")
            return json_response(*oa.error_body(errors.INTERNAL, "the gateway failed to start this request"))
        return CompletionResponse(choices)

    async def models(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = [self._model_card(m) for m in self.path.client.models.values()]
        return json_response(200, msgspec.json.encode({"object": "list", "data": data}))

    async def model(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        name = request.path_params["model"]
        info = self.path.client.models.get(name)
        if info is None:
            return json_response(*oa.error_body(errors.NOT_FOUND, f"model {name!r} is not served here", "model"))
        return json_response(200, msgspec.json.encode(self._model_card(info)))

    def _model_card(self, m) -> dict:
        return {"id": m.name, "object": "model", "created": self.created, "owned_by": "inflight", "max_model_len": m.max_seq_len}


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


class _Server(uvicorn.Server):
    def capture_signals(self):
        return contextlib.nullcontext()  # the gateway's own handlers drain gRPC and HTTP together


def listen_sockets(address: str) -> list[socket.socket]:
    """Listening sockets for host:port (every address the host names, as grpc binds them),
    with SO_REUSEPORT: several gateway processes share the port, the kernel spreading new
    connections over them."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"error: --http-listen {address}: expected host:port")
    host = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SystemExit(f"error: --http-listen {address}: {e.strerror}") from None
    socks, problems = [], []
    for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(2048)
            sock.setblocking(False)
            socks.append(sock)
        except OSError as e:
            sock.close()
            problems.append(f"{sockaddr[0]}: {e.strerror}")
    if not socks:
        raise SystemExit(f"error: cannot listen on {address} for HTTP ({'; '.join(problems)}); choose another with --http-listen")
    return socks


class HttpServer:
    """uvicorn serving `app` on the running loop, on sockets bound up front."""

    def __init__(self, app, address: str, cert: str = "", key: str = "", client_ca: str = ""):
        self.address = address
        self.sockets = listen_sockets(address)
        config = uvicorn.Config(app, http="httptools", ws="none", lifespan="off", log_config=None, access_log=False,
                                server_header=False, timeout_graceful_shutdown=1, ssl_certfile=cert or None, ssl_keyfile=key or None,
                                ssl_ca_certs=client_ca or None, ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(self.sockets))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()
            raise SystemExit(f"error: the HTTP server on {self.address} did not start")

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            await self.task
