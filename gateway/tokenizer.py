"""TextTokenizer: a model's tokenizer.json and chat template, as the gateway uses them."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from inflight.errors import invalid
from models.errors import ModelError


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self._template = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(template)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TextTokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{path}: cannot load tokenizer: {e}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except ValueError as e:
            raise ModelError(f"{cfg_path}: unreadable: {e}") from None
        return cls(tok, config, str(model_dir))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise invalid("chat", f"the model at {self.source} has no chat template; send text or token_ids")
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise invalid(f"chat.messages[{i}].role", "must not be empty")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise invalid("chat", f"the chat template rejected the messages: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template already holds every special token the model expects.
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def decode_stream(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self.tokenizer)


class IncrementalDetokenizer:
    """Turns token ids, as they arrive, into text that never ends in half a character.

    The pieces concatenate to the full decode of all the ids (special tokens skipped)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        parts = []
        for t in token_ids:
            piece = self._stream.step(self._tokenizer, t)
            if piece:
                parts.append(piece)
        return "".join(parts)


def _raise_template_error(message: str):
    raise TemplateError(message)
