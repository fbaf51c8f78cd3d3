"""The batched sampler on hand-made logits: every knob against a direct computation."""

import pytest
import torch

from inflight.sampling_params import SamplingParams
from worker.embedded.sampler import sample
from worker.embedded.sequence import Sequence

EOS = (0,)


def seqs(*params, prompt=(5, 6), outputs=()):
    out = []
    for i, p in enumerate(params):
        s = Sequence(str(i), list(prompt), p)
        s.output_token_ids = list(outputs)
        out.append(s)
    return out


def test_greedy_takes_the_argmax():
    logits = torch.randn(3, 50)
    res = sample(logits, seqs(*[SamplingParams(temperature=0)] * 3), EOS)
    assert res.token_ids == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(2, 50)
    res = sample(logits.clone(), seqs(SamplingParams(top_k=1), SamplingParams(top_p=1e-6)), EOS)
    assert res.token_ids == logits.argmax(-1).tolist()


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """1e-40 is 0 or a denormal in float32: logits / it overflow and the softmax gives NaN
    (before: token 0, every time). Below GREEDY_BELOW a request samples greedily, and the
    rows beside it still sample."""
    logits = torch.randn(4, 50)
    logits[:, 0] = -5.0  # token 0 is nobody's argmax
    params = [SamplingParams(temperature=t) for t in (1e-40, 1e-300, 5e-6)] + [SamplingParams(temperature=1.0, seed=3)]
    res = sample(logits.clone(), seqs(*params), EOS)
    assert res.token_ids[:3] == logits[:3].argmax(-1).tolist()
    assert 0 <= res.token_ids[3] < 50


def test_top_k_above_the_vocabulary_keeps_every_token():
    torch.manual_seed(0)
    logits = torch.zeros(1, 8)
    drawn = {sample(logits.clone(), seqs(SamplingParams(top_k=2**31 - 1)), EOS).token_ids[0] for _ in range(200)}
    assert drawn == set(range(8))


def test_samples_stay_inside_top_k_and_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * 5])
    counts = torch.zeros(10)
    for _ in range(3000):
        counts[sample(logits.clone(), seqs(SamplingParams(top_k=3)), EOS).token_ids[0]] += 1
    assert counts[3:].sum() == 0
    probs = torch.softmax(logits[0, :3], -1)
    assert torch.allclose(counts[:3] / 3000, probs, atol=0.03)


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits.clone(), seqs(SamplingParams(min_p=0.2)), EOS).token_ids[0] for _ in range(400)}
    assert seen == {0, 1, 2}  # 0.05 < 0.2 * 0.5


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits.clone(), seqs(SamplingParams(top_p=0.7)), EOS).token_ids[0] for _ in range(400)}
    assert seen == {0, 1}


def test_seed_gives_the_same_draws_whatever_the_batch():
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=1.0, seed=42)
    a = seqs(p)
    first = []
    for _ in range(8):
        first.append(sample(logits[:1].clone(), a, EOS).token_ids[0])
        a[0].output_token_ids.append(first[-1])
    b = seqs(SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.5), SamplingParams(temperature=1.0))
    second = []
    for _ in range(8):
        second.append(sample(logits[[1, 0, 2, 3]].clone(), b, EOS).token_ids[1])
        b[1].output_token_ids.append(second[-1])
    assert first == second
    assert len(set(first)) > 1  # the draws move on with the position


def test_a_seeded_request_resumed_mid_way_draws_what_it_would_have():
    logits = torch.randn(1, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    whole = seqs(p)
    for _ in range(10):
        whole[0].output_token_ids.append(sample(logits.clone(), whole, EOS).token_ids[0])
    resumed = seqs(p, outputs=whole[0].output_token_ids[:6])  # as a worker taking over after 6 tokens
    for _ in range(4):
        resumed[0].output_token_ids.append(sample(logits.clone(), resumed, EOS).token_ids[0])
    assert resumed[0].output_token_ids == whole[0].output_token_ids
    other = seqs(SamplingParams(temperature=1.0, seed=8))
    for _ in range(10):
        other[0].output_token_ids.append(sample(logits.clone(), other, EOS).token_ids[0])
    assert other[0].output_token_ids != whole[0].output_token_ids


def test_penalties_match_the_formula():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, 3.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=7)
    s = seqs(p, prompt=(1,), outputs=(4, 4, 3))
    res = sample(logits.clone(), s, EOS)
    expect = logits.clone()[0]
    expect[1] = -1.0 * 2.0  # prompt token, negative: multiplied
    expect[4] = 3.0 / 2.0 - 0.5 - 0.25 * 2  # output twice
    expect[3] = 0.5 / 2.0 - 0.5 - 0.25 * 1
    assert res.token_ids == [int(expect.argmax())]
    lp = res.logprobs[0]
    chosen, top = lp.logprob, lp.top
    ref = torch.log_softmax(expect, -1)
    assert lp.token_id == res.token_ids[0]
    assert dict(top) == pytest.approx({i: ref[i].item() for i in range(7)}, abs=1e-6)
    assert chosen == pytest.approx(ref[res.token_ids[0]].item(), abs=1e-6)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[10.0, 9.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(1,))
    assert sample(logits.clone(), seqs(p), EOS).token_ids == [2]
    assert sample(logits.clone(), seqs(p, outputs=(3, 3)), EOS).token_ids == [0]


def test_logprobs_of_a_mixed_batch():
    logits = torch.randn(2, 30)
    res = sample(logits.clone(), seqs(SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)), EOS)
    assert res.logprobs[1] is None
    top = res.logprobs[0].top
    assert [t for t, _ in top] == logits[0].topk(3).indices.tolist()
    assert [v for _, v in top] == pytest.approx(torch.log_softmax(logits[0], -1).topk(3).values.tolist(), abs=1e-6)
