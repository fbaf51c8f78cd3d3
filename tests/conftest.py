"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), converted once."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest

from worker.engine_api import EngineConfig, KvCacheConfig, SchedulerConfig


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(items):
    """test_compose_stack.py's images take minutes to make, mostly downloads, dpkg and pip:
    they are made on a thread from now on while the other tests run, and that file's tests
    run last."""
    compose = [item for item in items if item.module.__name__.rpartition(".")[2] == "test_compose_stack"]
    if compose:
        items[:] = [item for item in items if item not in compose] + compose
        compose[0].module.start_making_images()


@pytest.fixture(scope="session", autouse=True)
def stacks_ended():
    """Stacks that tests let end in the background (Stack.stop_later) have all ended by the
    end of the session."""
    yield
    from testing.stack import Stack

    Stack.wait_stopped()


@pytest.fixture(scope="session")
def default_stack():
    """The session's stack of `inflight serve` with the default settings (one worker, the
    default model), as a function: started at the first call, and again at the next call
    after a test stopped it. test_fuzz.py leaves it serving for test_openai_http.py, whose
    last test stops it; test_service.py starts the next."""
    from testing.stack import Stack

    held: list[Stack] = []

    def get() -> Stack:
        if not held or held[-1].proc.poll() is not None:
            held.append(Stack(workers=1, own_group=True))  # test_service.py's last test gives it a Ctrl-C
        return held[-1]

    yield get
    for s in held:
        s.stop_later()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from models.gguf_convert import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def model_weights(model_dir):
    """The model's config and tensors, read once and shared by every engine the tests build."""
    from models.config import ModelConfig
    from models.loader import iter_safetensors

    return ModelConfig.from_dir(model_dir), dict(iter_safetensors(model_dir))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from gateway.tokenizer import TextTokenizer

    return TextTokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def make_engine(model_weights):
    """Builds an EmbeddedEngine on the CPU with the real weights and the given knobs."""
    from worker.embedded.engine import EmbeddedEngine

    def make(
        tokens_per_block: int = 16,
        max_tokens: int | None = None,
        policy: str = "GUARANTEED_NO_EVICT",
        enable_block_reuse: bool = True,
        **kw,
    ) -> EmbeddedEngine:
        cfg = EngineConfig(
            device="cpu",
            kv_cache=KvCacheConfig(tokens_per_block=tokens_per_block, max_tokens=max_tokens, enable_block_reuse=enable_block_reuse, cpu_bytes=256 * 2**20),
            scheduler=SchedulerConfig(capacity_scheduler_policy=policy),
            **kw,
        )
        model_config, tensors = model_weights
        return EmbeddedEngine(cfg, dataclasses.replace(model_config), tensors.items())

    return make


@pytest.fixture(scope="session")
def engine_for(make_engine):
    """make_engine, but one engine per set of knobs, shared by the tests that ask for the
    same knobs. A test hands it back idle (every request finished or aborted); one left
    busy by a failed test is replaced. Its prefix cache and cumulative stats (preemptions,
    blocks reused, steps) carry over from earlier tests, so tests compare stats before
    and after; a test that needs a cold cache calls make_engine. The few most recently
    used are kept (each holds its own weights and KV cache, ~0.8 GB)."""
    engines: collections.OrderedDict[tuple, object] = collections.OrderedDict()

    def get(**knobs):
        key = tuple(sorted(knobs.items()))
        engine = engines.pop(key, None)
        if engine is None or engine.requests or engine.has_work():
            engine = make_engine(**knobs)
        engines[key] = engine
        while len(engines) > 3:
            engines.popitem(last=False)
        return engine

    return get


@pytest.fixture(scope="session")
def chat_reference(engine_for, tokenizer):
    """Three chat prompts with 32 greedy tokens of the 32-bit model appended, and its logits
    at every position of them: what test_quant.py compares quantized projections with and
    test_kv_fp8.py an FP8 KV cache, computed once for both."""
    import torch

    from inflight.sampling_params import SamplingParams
    from worker.embedded.smoothquant import forward_prompt

    engine = engine_for()
    texts = ["What is the capital of France?", "Write a haiku about the sea.", "法国的首都是哪里？"]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    seqs = [p + o for p, o in zip(prompts, outs)]
    with torch.no_grad():
        return seqs, [forward_prompt(engine.model, s, every_position=True) for s in seqs]


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """Hugging Face transformers on the same converted directory: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
