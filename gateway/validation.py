"""From protobuf requests to our own types, with the limits on what only the gateway sees
(prompt text before tokenizing, chat messages, request ids, ids to detokenize), which the
OpenAI HTTP API's translation (openai_protocol.py) applies too. The
values themselves are checked by the shared validator (inflight/validation.py), with
fields named as the client sent them."""

from __future__ import annotations

from inflight.errors import invalid
from inflight.sampling_params import SamplingParams
from inflight.v1 import pb

# Text (or a chat's contents together) is tokenized before max_seq_len can refuse it: 1 MiB
# is ~230k tokens of English, past any context we serve, and ~0.5 s of one core to tokenize.
MAX_PROMPT_BYTES = 1 << 20
# Each message is a pass of the chat template and a few tokens of markers; 1024 is a long
# agent conversation and ~0.3 s to render and tokenize.
MAX_CHAT_MESSAGES = 1024
# Detokenize: no sequence is longer than its model's max_seq_len; 128k ids is the longest
# context we expect and ~50 ms to decode.
MAX_DETOKENIZE_IDS = 1 << 17
# A stream keeps each open request's id and sends it back with every event.
MAX_REQUEST_ID_CHARS = 256
# Client strings quoted back in error messages are cut to this many characters.
QUOTED_CHARS = 64

_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty")
_PLAIN = ("top_k", "min_p", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "logprobs")


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    kwargs.update({name: getattr(msg, name) for name in _PLAIN})
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    return SamplingParams(**kwargs)


def _utf8_over(texts: list[str], limit: int) -> int | None:
    """The texts' UTF-8 bytes together if over `limit`, else None; encodes nothing when
    their length in characters settles it (at most 4 bytes a character)."""
    if sum(map(len, texts)) * 4 <= limit:
        return None
    n = sum(len(t.encode()) for t in texts)
    return n if n > limit else None


def prompt_text(text: str, field: str) -> str:
    n = _utf8_over([text], MAX_PROMPT_BYTES)
    if n is not None:
        raise invalid(field, f"has {n} bytes; at most {MAX_PROMPT_BYTES}")
    return text


def chat_messages(msg: pb.ChatMessages, field: str) -> list[dict]:
    """The messages as the chat template takes them; their roles are the template's to
    check (TextTokenizer.render_chat)."""
    check_chat_size(len(msg.messages), [m.content for m in msg.messages], f"{field}.messages")
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def check_chat_size(n: int, contents: list[str], field: str) -> None:
    """A chat's limits, whichever protocol brought it; `field` names its message list."""
    if not n:
        raise invalid(field, "must hold at least one message")
    if n > MAX_CHAT_MESSAGES:
        raise invalid(field, f"has {n} messages; at most {MAX_CHAT_MESSAGES}")
    total = _utf8_over(contents, MAX_PROMPT_BYTES)
    if total is not None:
        raise invalid(field, f"contents have {total} bytes together; at most {MAX_PROMPT_BYTES}")


def detokenize_ids(ids, field: str) -> list[int]:
    if len(ids) > MAX_DETOKENIZE_IDS:
        raise invalid(field, f"has {len(ids)} ids; at most {MAX_DETOKENIZE_IDS}")
    return list(ids)


def request_id(rid: str, field: str) -> None:
    if not rid:
        raise invalid(field, "must not be empty")
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise invalid(field, f"has {len(rid)} characters; at most {MAX_REQUEST_ID_CHARS}")


def quoted(value: str) -> str:
    """A client's string as error messages quote it: repr, cut short."""
    return repr(value) if len(value) <= QUOTED_CHARS else repr(value[:QUOTED_CHARS]) + f"... ({len(value)} characters)"
