"""ModelConfig: what the engine needs from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from models.errors import ModelError
from models.quantized_checkpoint import CheckpointQuantization, read_quantization

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
}


@dataclasses.dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v biases
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    name: str = "model"
    quantization: CheckpointQuantization | None = None  # a checkpoint shipped already quantized

    @classmethod
    def from_dict(cls, cfg: dict, name: str = "model") -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"architecture {arch} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        # transformers 5 writes rope settings under rope_parameters.
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            name=name,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: not found; a model directory needs config.json, *.safetensors and tokenizer.json") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: unreadable: {e}") from None
        try:
            config = cls.from_dict(cfg, name=Path(model_dir).name)
        except KeyError as e:
            raise ModelError(f"{path}: missing key {e}") from None
        config.quantization = read_quantization(model_dir, cfg)
        gen = Path(model_dir) / "generation_config.json"
        if gen.exists():  # generation_config's eos list (e.g. Llama 3's) wins over config.json
            try:
                g = json.loads(gen.read_text()).get("eos_token_id")
            except ValueError as e:
                raise ModelError(f"{gen}: unreadable: {e}") from None
            if g is not None:
                config.eos_token_ids = tuple(g) if isinstance(g, list) else (g,)
        return config


def served_model_name(model_dir: Path) -> str:
    """The name clients use: the GGUF's base name for a converted model, else the folder's."""
    marker = Path(model_dir) / "inflight-conversion.json"
    if marker.exists():
        try:
            source = json.loads(marker.read_text()).get("source", "")
        except ValueError:
            source = ""
        if source:
            return Path(source).name.split(".")[0]
    return Path(model_dir).resolve().name
