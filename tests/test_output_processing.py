"""Incremental detokenization and stop strings in the gateway (real tokenizer)."""

import random

from gateway.output import OutputProcessor
from inflight.schema import RequestOutput


def feed(proc, ids, sizes, finish="length") -> list[str]:
    """Push ids in chunks of the given sizes (the last chunk carries the finish reason)
    until the request ends; the text of each."""
    texts, i = [], 0
    for n in sizes:
        chunk = ids[i : i + n]
        i += n
        texts.append(proc.process(RequestOutput("r", chunk, finish if i >= len(ids) else None)))
        if proc.finish_reason:
            break
    return texts


def test_deltas_concatenate_to_full_decode_for_any_split(tokenizer):
    text = "Grüße aus 北京 🎉👩‍👩‍👧 — naïve café, 東京タワー ok"
    ids = tokenizer.encode(text)
    rng = random.Random(3)
    for _ in range(30):
        sizes, left = [], len(ids)
        while left:
            n = rng.randint(1, 3)
            sizes.append(min(n, left))
            left -= sizes[-1]
        texts = feed(OutputProcessor(tokenizer), ids, sizes)
        assert all("\ufffd" not in t for t in texts)
        assert "".join(texts) == tokenizer.decode(ids) == text


def test_stop_string_split_across_deltas(tokenizer):
    text = "The answer is forty two. END of story and more"
    ids = tokenizer.encode(text)
    proc = OutputProcessor(tokenizer, ("END",))
    texts = feed(proc, ids, [1] * len(ids))
    assert proc.finish_reason == "stop" and proc.matched_stop == "END"
    assert "".join(texts) == "The answer is forty two. "
    assert len(texts) < len(ids)  # it ended at the stop string, not at the last token


def test_earliest_of_several_stops_wins(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta")
    proc = OutputProcessor(tokenizer, ("delta", "beta"))
    texts = feed(proc, ids, [len(ids)])
    assert proc.matched_stop == "beta" and texts[-1] == "alpha "


def test_held_back_text_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("no stop here at all")
    proc = OutputProcessor(tokenizer, ("STOPWORD",))
    texts = feed(proc, ids, [1] * len(ids))
    assert proc.finish_reason == "length" and not proc.matched_stop
    assert "".join(texts) == "no stop here at all"


def test_special_tokens_are_not_text(tokenizer):
    ids = tokenizer.encode("Hi") + [2]  # <|im_end|>
    proc = OutputProcessor(tokenizer)
    assert feed(proc, ids, [len(ids)], finish="stop") == ["Hi"]
    assert proc.finish_reason == "stop" and proc.completion_tokens == len(ids)


def test_errors_add_no_text_and_no_finish_reason(tokenizer):
    proc = OutputProcessor(tokenizer)
    assert proc.process(RequestOutput("r", [], error_code="UNAVAILABLE", error_message="gone")) == ""
    assert proc.finish_reason is None
