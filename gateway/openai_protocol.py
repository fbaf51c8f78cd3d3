"""The OpenAI HTTP API's JSON, translated to our own types at this edge (requests) and back
(responses, stream chunks, errors), as validation.py does for protobuf. Parameters are
named in errors as the client sent them ("max_completion_tokens", "messages[1].content");
the values are checked by the shared validator like any gRPC request's."""

from __future__ import annotations

import dataclasses

import msgspec

from gateway.request_path import Prompt
from gateway.validation import MAX_PROMPT_BYTES, check_chat_size, prompt_text, quoted
from inflight import errors
from inflight.errors import RequestError, invalid
from inflight.sampling_params import SamplingParams

# Every choice is one request to the scheduler (n times the prompts of a completion).
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20

# Our own sampling fields, under their own names (`extra_body` in the openai client).
EXTRA_INT = ("top_k", "min_tokens")
EXTRA_FLOAT = ("min_p", "repetition_penalty")
COMMON = {"model", "stream", "stream_options", "n", "temperature", "top_p", "seed", "stop", "presence_penalty",
          "frequency_penalty", "user", "logprobs", *EXTRA_INT, *EXTRA_FLOAT, "ignore_eos", "stop_token_ids"}
CHAT = COMMON | {"messages", "max_tokens", "max_completion_tokens", "top_logprobs"}
COMPLETION = COMMON | {"prompt", "max_tokens", "best_of", "echo", "suffix"}
# OpenAI parameters this server does not implement: refused by name, never silently dropped.
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "parallel_tool_calls",
               "audio", "modalities", "prediction", "reasoning_effort", "web_search_options", "service_tier", "store", "metadata"}

# Our status codes as the OpenAI API answers them: (HTTP status, error type, error code).
STATUS = {
    errors.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    errors.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    errors.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    errors.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    errors.DEADLINE_EXCEEDED: (504, "timeout", "timeout"),
    errors.CANCELLED: (499, "cancelled", "cancelled"),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
}
ROLES_AS = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclasses.dataclass
class CompletionRequest:
    """A chat completion (`chat`) or a completion, as our types."""

    chat: bool
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token shown (chat: top_logprobs; completions: logprobs)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # our field -> the client's name for it

    def client_error(self, e: RequestError) -> RequestError:
        """`e` with its field named as the client sent it."""
        if e.field is None:
            return e
        head, sep, rest = e.field.partition("[")
        name = self.names.get(head, head)
        return RequestError(e.code, e.reason, name + sep + rest)


def error_body(code: str, message: str, param: str | None = None) -> tuple[int, bytes]:
    """(HTTP status, body) of an error as the OpenAI API shapes it."""
    status, kind, err_code = STATUS.get(code, (500, "server_error", "internal_error"))
    return status, msgspec.json.encode({"error": {"message": message, "type": kind, "param": param, "code": err_code}})


def request_error_body(e: RequestError) -> tuple[int, bytes]:
    return error_body(e.code, e.message, e.field)


def parse_json(raw: bytes) -> dict:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise invalid("body", f"not valid JSON: {e}") from None
    except RecursionError:
        raise invalid("body", "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def _typed(body: dict, key: str, kind, what: str):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise invalid(key, f"must be {what}, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__)


def _int(body, key):
    return _typed(body, key, int, "an integer")


def _float(body, key):
    value = _typed(body, key, (int, float), "a number")
    return None if value is None else float(value)


def _bool(body, key):
    return _typed(body, key, bool, "a boolean")


def _stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list):
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise invalid(f"stop[{i}]", f"must be a string, got {_json_type(s)}")
        return tuple(stop)
    raise invalid("stop", f"must be a string or an array of strings, got {_json_type(stop)}")


def _int_list(value, field: str) -> list[int]:
    if not isinstance(value, list):
        raise invalid(field, f"must be an array of integers, got {_json_type(value)}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise invalid(f"{field}[{i}]", f"must be an integer, got {_json_type(t)}")
    return value


def _check_keys(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in UNSUPPORTED:
            if value in (None, False, [], {}) or key == "response_format" and value == {"type": "text"}:
                continue  # the default, asked for explicitly
            raise invalid(key, "is not supported by this server")
        raise invalid(key, f"unrecognized request argument {quoted(key)}")


def parse_request(body: dict, chat: bool) -> CompletionRequest:
    """A POST /v1/chat/completions (`chat`) or /v1/completions body as our types; RequestError
    (INVALID_ARGUMENT naming the parameter) for anything wrong in it."""
    _check_keys(body, CHAT if chat else COMPLETION)
    model = _typed(body, "model", str, "a string")
    if not model:
        raise invalid("model", "is required")
    names = {}
    kwargs = {}
    if chat:
        prompts = [_messages(body.get("messages"))]
        if body.get("max_completion_tokens") is not None:
            kwargs["max_tokens"] = _int(body, "max_completion_tokens")
            names["max_tokens"] = "max_completion_tokens"
        elif body.get("max_tokens") is not None:
            kwargs["max_tokens"] = _int(body, "max_tokens")
    else:
        prompts = _prompts(body.get("prompt"))
        if body.get("max_tokens") is not None:
            kwargs["max_tokens"] = _int(body, "max_tokens")
        if _bool(body, "echo"):
            raise invalid("echo", "is not supported by this server")
        if body.get("suffix") is not None:
            raise invalid("suffix", "is not supported by this server")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", *EXTRA_FLOAT):
        if (v := _float(body, key)) is not None:
            kwargs[key] = v
    for key in ("seed", *EXTRA_INT):
        if (v := _int(body, key)) is not None:
            kwargs[key] = v
    if _bool(body, "ignore_eos"):
        kwargs["ignore_eos"] = True
    kwargs["stop"] = _stop(body)
    if body.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = tuple(_int_list(body["stop_token_ids"], "stop_token_ids"))
    _typed(body, "user", str, "a string")  # taken and ignored
    n = _int(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise invalid("n", f"must be at least 1, got {n}")
    if not chat and (best_of := _int(body, "best_of")) is not None and best_of != n:
        raise invalid("best_of", "is not supported by this server unless it equals n")
    if n * len(prompts) > MAX_CHOICES:
        raise invalid("n", f"{n} choices for each of {len(prompts)} prompts make {n * len(prompts)}; at most {MAX_CHOICES}")
    logprobs, top = _logprobs(body, chat)
    if logprobs:  # the engine returns the sampled token's logprob with at least one alternative
        kwargs["logprobs"] = max(top, 1)
        names["logprobs"] = "top_logprobs" if chat else "logprobs"
    stream = bool(_bool(body, "stream"))
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict):
            raise invalid("stream_options", f"must be an object, got {_json_type(options)}")
        for key in options:
            if key != "include_usage":
                raise invalid(f"stream_options.{key}", "unrecognized; include_usage is the one option")
        include_usage = bool(_typed(options, "include_usage", bool, "a boolean"))
    return CompletionRequest(chat, model, prompts, SamplingParams(**kwargs), n, stream, include_usage, logprobs, top, names)


def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
    if chat:
        on = bool(_bool(body, "logprobs"))
        top = _int(body, "top_logprobs")
        if top and not on:
            raise invalid("top_logprobs", "needs logprobs: true")
        top = top or 0
        field = "top_logprobs"
    else:
        top = _int(body, "logprobs")
        on = top is not None
        top = top or 0
        field = "logprobs"
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid(field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return on, top


def _messages(messages) -> Prompt:
    if not isinstance(messages, list):
        raise invalid("messages", "is required: an array of messages" if messages is None else
                      f"must be an array of messages, got {_json_type(messages)}")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(field, f"must be an object, got {_json_type(m)}")
        for key in m:
            if key not in ("role", "content", "name"):
                raise invalid(f"{field}.{key}", "is not supported by this server" if key in ("tool_calls", "tool_call_id", "function_call", "audio", "refusal")
                              else f"unrecognized message field {quoted(key)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid(f"{field}.role", f"must be a string, got {_json_type(role)}" if role is not None else "is required")
        out.append({"role": ROLES_AS.get(role, role), "content": _content(m.get("content"), f"{field}.content")})
    check_chat_size(len(out), [m["content"] for m in out], "messages")
    return Prompt("messages", chat=out)


def _content(content, field: str) -> str:
    """A message's content: a string, or an array of text parts (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(field, f"must be a string or an array of content parts, got {_json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise invalid(f"{field}[{j}]", f"must be an object, got {_json_type(part)}")
        if part.get("type") != "text":
            raise invalid(f"{field}[{j}].type", f"{quoted(str(part.get('type')))} is not supported; this model takes text parts only")
        if not isinstance(part.get("text"), str):
            raise invalid(f"{field}[{j}].text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompts(prompt) -> list[Prompt]:
    """A completion's prompt: a string, token ids, or an array of either (one choice set each)."""
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, str):
        return [_text_prompt(prompt, "prompt")]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", "must be a string, an array of token ids, or a non-empty array of either")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [Prompt("prompt", token_ids=prompt)]
    out = []
    for i, p in enumerate(prompt):
        field = f"prompt[{i}]"
        out.append(_text_prompt(p, field) if isinstance(p, str) else Prompt(field, token_ids=_int_list(p, field)))
    if sum(len(p.text or "") for p in out) * 4 > MAX_PROMPT_BYTES:
        prompt_text("".join(p.text or "" for p in out), "prompt")
    return out


def _text_prompt(text: str, field: str) -> Prompt:
    if not text:
        raise invalid(field, "must not be empty")
    return Prompt(field, text=prompt_text(text, field))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
