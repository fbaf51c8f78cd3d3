"""The one request validator: the gateway runs it before a request leaves (with the
fields named as the client sent them, "start.sampling.top_p"), and every engine runs it
again at submit (a worker serves whatever reaches it; `inflight generate` has no gateway).
Each check raises RequestError(INVALID_ARGUMENT) naming the first bad field."""

from __future__ import annotations

import math

from inflight.errors import RequestError, invalid, under
from inflight.sampling_params import SamplingParams

MAX_LOGPROBS = 20
# Each stop string is searched for in every delta's text, and the longest one holds back
# that much streamed text: 16 covers a template's end markers plus a caller's own
# (OpenAI allows 4, vLLM has no limit), 256 characters any marker or sentence.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Every sampled token is looked up among them; a model has a few end tokens, 64 leaves
# room for a caller's own without letting one request ban half the vocabulary.
MAX_STOP_TOKEN_IDS = 64


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_seq_len: int,
                  prompt_field: str = "prompt_token_ids", sampling_field: str = "", output_token_ids=()) -> None:
    """A prompt and its sampling parameters against a model's vocabulary and length;
    `sampling_field` prefixes the sampling fields' names. `output_token_ids`: what a
    request moved from a worker that died had produced; room must be left for more."""
    check_prompt(prompt_token_ids, vocab_size, max_seq_len, prompt_field)
    try:
        check_sampling(params, vocab_size, max_seq_len)
    except RequestError as e:
        raise under(sampling_field, e) if sampling_field else e from None
    if output_token_ids:
        check_vocab(output_token_ids, vocab_size, "output_token_ids")
        done = len(output_token_ids)
        if done >= params.max_tokens or len(prompt_token_ids) + done >= max_seq_len:
            raise invalid("output_token_ids", f"{done} tokens already leave no room under max_tokens {params.max_tokens} "
                                              f"and max_seq_len {max_seq_len}")


def check_prompt(ids: list[int], vocab_size: int, max_seq_len: int, field: str) -> None:
    n = len(ids)
    if n == 0:
        raise invalid(field, "must not be empty")
    if n >= max_seq_len:
        raise invalid(field, f"has {n} tokens; the model's max_seq_len {max_seq_len} leaves room for at most {max_seq_len - 1}")
    check_vocab(ids, vocab_size, field)


def check_vocab(ids, vocab_size: int, field: str) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # min and max run in C: cheap on every prompt
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise invalid(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_sampling(p: SamplingParams, vocab_size: int, max_seq_len: int) -> None:
    def finite(name: str, value: float) -> None:
        if not math.isfinite(value):
            raise invalid(name, f"must be a finite number, got {value}")

    if p.max_tokens < 1:
        raise invalid("max_tokens", f"must be at least 1, got {p.max_tokens}")
    if p.max_tokens > max_seq_len:
        raise invalid("max_tokens", f"{p.max_tokens} exceeds the model's max_seq_len {max_seq_len}")
    finite("temperature", p.temperature)
    if p.temperature < 0:
        raise invalid("temperature", f"must be >= 0, got {p.temperature}")
    if not 0 <= p.top_k < 2**31:  # above the vocabulary it keeps every token (the sampler clamps)
        raise invalid("top_k", f"must be from 0 (off) to 2^31 - 1, got {p.top_k}")
    finite("top_p", p.top_p)
    if not 0.0 < p.top_p <= 1.0:
        raise invalid("top_p", f"must be in (0, 1], got {p.top_p}")
    finite("min_p", p.min_p)
    if not 0.0 <= p.min_p <= 1.0:
        raise invalid("min_p", f"must be in [0, 1], got {p.min_p}")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise invalid("seed", f"must be in [0, 2^63), got {p.seed}")
    if p.min_tokens < 0:
        raise invalid("min_tokens", f"must be >= 0, got {p.min_tokens}")
    if p.min_tokens > p.max_tokens:
        raise invalid("min_tokens", f"must not exceed max_tokens ({p.max_tokens}), got {p.min_tokens}")
    finite("repetition_penalty", p.repetition_penalty)
    if p.repetition_penalty <= 0:
        raise invalid("repetition_penalty", f"must be > 0, got {p.repetition_penalty}")
    finite("presence_penalty", p.presence_penalty)
    if not -2.0 <= p.presence_penalty <= 2.0:
        raise invalid("presence_penalty", f"must be in [-2, 2], got {p.presence_penalty}")
    finite("frequency_penalty", p.frequency_penalty)
    if not -2.0 <= p.frequency_penalty <= 2.0:
        raise invalid("frequency_penalty", f"must be in [-2, 2], got {p.frequency_penalty}")
    if not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise invalid("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"has {len(p.stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(p.stop):
        if not s:
            raise invalid(f"stop[{i}]", "stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise invalid(f"stop[{i}]", f"has {len(s)} characters; at most {MAX_STOP_CHARS}")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid("stop_token_ids", f"has {len(p.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
    for t in p.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise invalid("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")
