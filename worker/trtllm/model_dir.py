"""ModelDir: what the TensorRT-LLM engine needs to know about the directory it is given,
a Hugging Face checkpoint or an engine that `trtllm-build` made, before TensorRT-LLM
loads it: which of the two it is, and the facts the worker announces and validates
requests against (vocabulary, sequence length, end tokens)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from models.errors import ModelError


@dataclasses.dataclass
class ModelDir:
    path: Path
    format: Literal["hf", "engine"]  # a Hugging Face checkpoint, or a prebuilt TensorRT engine
    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    tokens_per_block: int | None  # an engine's KV block size, fixed when it was built


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: not found; --engine trtllm takes a Hugging Face checkpoint directory or a "
                         f"trtllm-build engine directory, each with a config.json") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable: {e}") from None


def _eos(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def read_model_dir(path: Path) -> ModelDir:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    gen = path / "generation_config.json"
    eos = _eos(_read_json(gen).get("eos_token_id")) if gen.exists() else ()  # wins, as in models/config.py
    try:
        if "build_config" in cfg:  # trtllm-build writes the build and the model's config side by side
            build, pretrained = cfg["build_config"], cfg["pretrained_config"]
            tokens_per_block = (build.get("plugin_config") or {}).get("tokens_per_block") or build.get("tokens_per_block")
            facts = ModelDir(path, "engine", pretrained["vocab_size"], build["max_seq_len"], eos, tokens_per_block)
        else:
            text = cfg.get("text_config", cfg)  # multimodal checkpoints keep the decoder's under text_config
            facts = ModelDir(path, "hf", text["vocab_size"], text.get("max_position_embeddings", 4096),
                             eos or _eos(cfg.get("eos_token_id")), None)
    except KeyError as e:
        raise ModelError(f"{path / 'config.json'}: missing key {e}") from None
    if not facts.eos_token_ids:
        raise ModelError(f"{path}: no eos_token_id in generation_config.json or config.json; TensorRT-LLM is run without "
                         f"a tokenizer, so the end token must be named (copy the checkpoint's generation_config.json "
                         f"beside an engine)")
    return facts
