"""OutputProcessor: turns one request's token batches into text deltas, applying stop
strings on the text (also across delta boundaries)."""

from __future__ import annotations

import dataclasses

from gateway.tokenizer import TextTokenizer
from inflight.schema import TokenItem, TokenLogprobMsg


@dataclasses.dataclass
class Update:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobMsg] | None = None
    finish_reason: str | None = None  # "stop" | "length" when the request ended well
    matched_stop: str = ""
    error_code: str | None = None
    error_message: str = ""

    @property
    def terminal(self) -> bool:
        return self.finish_reason is not None or self.error_code is not None


class OutputProcessor:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()):
        self.detok = tokenizer.decode_stream()
        self.stop = stop
        # Text that could be the start of a stop string is held back until it is not.
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def process(self, item: TokenItem) -> Update:
        self.prompt_tokens = item.prompt_tokens or self.prompt_tokens
        self.cached_tokens = item.cached_tokens or self.cached_tokens
        self.completion_tokens += len(item.token_ids)
        if item.error_code:
            return Update([], "", error_code=item.error_code, error_message=item.error_message or "")
        text = self.pending + self.detok.push(item.token_ids)
        if self.stop:
            cut = self._find_stop(text)
            if cut is not None:
                index, s = cut
                self.pending = ""
                return Update(item.token_ids, text[:index], item.logprobs, "stop", s)
        if item.finish_reason is not None:
            self.pending = ""
            return Update(item.token_ids, text, item.logprobs, item.finish_reason)
        if self.hold:
            keep = min(self.hold, len(text))
            text, self.pending = text[: len(text) - keep], text[len(text) - keep :]
        return Update(item.token_ids, text, item.logprobs)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best
