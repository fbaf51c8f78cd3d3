"""The one place a model setting becomes a directory."""

from __future__ import annotations

from pathlib import Path


def locate_model(model: str | None) -> Path:
    """The directory `model` names; unset means the built-in SmolLM2-135M-Instruct,
    converted once into the cache (see gguf_convert)."""
    if model:
        return Path(model)
    from models.gguf_convert import default_model_dir

    return default_model_dir()
