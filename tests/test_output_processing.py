"""Incremental detokenization and stop strings in the gateway (real tokenizer)."""

import random

from gateway.output import OutputProcessor
from inflight.schema import TokenItem


def feed(proc, ids, sizes, finish="length"):
    """Push ids in chunks of the given sizes; the last chunk carries the finish reason."""
    ups, i = [], 0
    for n in sizes:
        chunk = ids[i : i + n]
        i += n
        ups.append(proc.process(TokenItem("r", chunk, finish if i >= len(ids) else None)))
        if ups[-1].terminal:
            break
    return ups


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
        ups = feed(OutputProcessor(tokenizer), ids, sizes)
        assert all("\ufffd" not in u.text for u in ups)
        assert "".join(u.text for u in ups) == tokenizer.decode(ids) == text


def test_stop_string_split_across_deltas(tokenizer):
    text = "The answer is forty two. END of story and more"
    ids = tokenizer.encode(text)
    ups = feed(OutputProcessor(tokenizer, ("END",)), ids, [1] * len(ids))
    assert ups[-1].finish_reason == "stop" and ups[-1].matched_stop == "END"
    assert "".join(u.text for u in ups) == "The answer is forty two. "


def test_earliest_of_several_stops_wins(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta")
    ups = feed(OutputProcessor(tokenizer, ("delta", "beta")), ids, [len(ids)])
    assert ups[-1].matched_stop == "beta" and ups[-1].text == "alpha "


def test_held_back_text_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("no stop here at all")
    ups = feed(OutputProcessor(tokenizer, ("STOPWORD",)), ids, [1] * len(ids))
    assert ups[-1].finish_reason == "length" and not ups[-1].matched_stop
    assert "".join(u.text for u in ups) == "no stop here at all"


def test_special_tokens_are_not_text(tokenizer):
    ids = tokenizer.encode("Hi") + [2]  # <|im_end|>
    ups = feed(OutputProcessor(tokenizer), ids, [len(ids)], finish="stop")
    assert ups[-1].text == "Hi" and ups[-1].token_ids == ids


def test_error_items_end_the_request(tokenizer):
    up = OutputProcessor(tokenizer).process(TokenItem("r", [], error_code="UNAVAILABLE", error_message="gone"))
    assert up.terminal and up.error_code == "UNAVAILABLE"
