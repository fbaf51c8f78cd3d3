"""OutputProcessor: turns one request's outputs into text deltas, applying stop strings
on the text (also across delta boundaries)."""

from __future__ import annotations

from gateway.tokenizer import TextTokenizer
from inflight.schema import RequestOutput


class OutputProcessor:
    """One request's text so far. `finish_reason` (and `matched_stop`) are set once the
    request ended well, whether the engine ended it or a stop string did."""

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()):
        self.detok = tokenizer.decode_stream()
        self.stop = stop
        # Text that could be the start of a stop string is held back until it is not.
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop" | "length"
        self.matched_stop = ""

    def process(self, out: RequestOutput) -> str:
        """The text `out` adds (none for an error, which ends the request as it is)."""
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        self.completion_tokens += len(out.new_token_ids)
        if out.error_code:
            return ""
        text = self.pending + self.detok.push(out.new_token_ids)
        if self.stop:
            cut = self._find_stop(text)
            if cut is not None:
                index, self.matched_stop = cut
                self.pending = ""
                self.finish_reason = "stop"
                return text[:index]
        if out.finish_reason is not None:
            self.pending = ""
            self.finish_reason = out.finish_reason
            return text
        if self.hold:
            keep = min(self.hold, len(text))
            text, self.pending = text[: len(text) - keep], text[len(text) - keep :]
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best
