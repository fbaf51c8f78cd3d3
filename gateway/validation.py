"""From protobuf requests to our own types, refusing bad input with the field named."""

from __future__ import annotations

from inflight.errors import RequestError, invalid, under
from inflight.sampling_params import SamplingParams
from inflight.v1 import pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty")
_PLAIN = ("top_k", "min_p", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "logprobs")


def sampling_params(msg: pb.SamplingParams, vocab_size: int, max_seq_len: int, field: str = "sampling") -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    kwargs.update({name: getattr(msg, name) for name in _PLAIN})
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    params = SamplingParams(**kwargs)
    try:
        params.validate(vocab_size)
    except RequestError as e:
        raise under(field, e) from None
    if params.max_tokens > max_seq_len:
        raise invalid(f"{field}.max_tokens", f"{params.max_tokens} exceeds the model's max_seq_len {max_seq_len}")
    return params


def chat_messages(msg: pb.ChatMessages, field: str) -> list[dict]:
    if not msg.messages:
        raise invalid(f"{field}.messages", "must hold at least one message")
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def check_vocab(ids: list[int], vocab_size: int, field: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise invalid(field, f"token id {t} is outside the vocabulary [0, {vocab_size})")


def token_ids(ids, vocab_size: int, field: str) -> list[int]:
    ids = list(ids)
    if not ids:
        raise invalid(field, "must not be empty")
    check_vocab(ids, vocab_size, field)
    return ids


def check_prompt_length(n: int, max_seq_len: int, field: str) -> None:
    if n == 0:
        raise invalid(field, "must not be empty")
    if n >= max_seq_len:
        raise invalid(field, f"has {n} tokens; the model's max_seq_len {max_seq_len} leaves room for {max_seq_len - 1}")
