"""The embedded engine against Hugging Face transformers on the same real weights."""

from __future__ import annotations

import pytest
import torch

from inflight.sampling_params import SamplingParams

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "法国的首都是哪里？",
]
# Greedy tokens compared per prompt, each a decode step of both models (about 0.15 s together
# on the CPU); the logprobs test below compares every step's distribution besides.
GREEDY_TOKENS = 16
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away, there lived a",
]


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache, EOS not special (ignore_eos)."""
    out: list[int] = []
    with torch.no_grad():
        res = hf_model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(n):
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            res = hf_model(torch.tensor([[token]]), past_key_values=res.past_key_values, use_cache=True)
    return out


@pytest.fixture(scope="module")
def engine(engine_for):
    return engine_for()


def test_default_model_answers_paris(engine, tokenizer):
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    [out] = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0))
    assert tokenizer.decode(out).startswith("The capital of France is Paris.")


@pytest.mark.parametrize("text,chat", [(p, True) for p in CHAT_PROMPTS] + [(p, False) for p in RAW_PROMPTS])
def test_greedy_matches_transformers(engine, hf_model, tokenizer, text, chat):
    prompt = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    [ours] = engine.generate([prompt], SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True))
    assert ours == hf_greedy(hf_model, prompt, GREEDY_TOKENS)


def test_logprobs_match_transformers_logits(engine, hf_model, tokenizer):
    """Every step's top-20 log-probabilities equal log_softmax of transformers' logits."""
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    rid = "lp"
    engine.submit(rid, prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=20, ignore_eos=True))
    steps = []
    while engine.has_work():
        for out in engine.step():
            steps += out.logprobs
    tokens = [s.token_id for s in steps]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    assert len(steps) == 12
    worst = 0.0
    for i, s in enumerate(steps):
        ids = torch.tensor([t for t, _ in s.top])
        ours = torch.tensor([lp for _, lp in s.top])
        assert torch.equal(ids[:1], ref[i].topk(1).indices), f"step {i}: best token differs"
        worst = max(worst, (ours - ref[i][ids]).abs().max().item())
        assert s.logprob == pytest.approx(ref[i][s.token_id].item(), abs=1e-3)
    assert worst < 1e-3, f"largest logprob difference {worst}"
