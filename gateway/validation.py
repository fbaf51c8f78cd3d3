"""From protobuf requests to our own types. The values themselves are checked by the
shared validator (inflight/validation.py), with fields named as the client sent them."""

from __future__ import annotations

from inflight.errors import invalid
from inflight.sampling_params import SamplingParams
from inflight.v1 import pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty")
_PLAIN = ("top_k", "min_p", "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "logprobs")


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    kwargs.update({name: getattr(msg, name) for name in _PLAIN})
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    return SamplingParams(**kwargs)


def chat_messages(msg: pb.ChatMessages, field: str) -> list[dict]:
    if not msg.messages:
        raise invalid(f"{field}.messages", "must hold at least one message")
    return [{"role": m.role, "content": m.content} for m in msg.messages]
