"""TextTokenizer: a model's tokenizer.json and chat template, as the gateway uses them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel, DecodeStream

from gateway.validation import quoted
from inflight.errors import invalid
from models.errors import ModelError


# Roles a chat may use. Many templates (ChatML, SmolLM2's) paste any role into the prompt
# as it is, so a template's own checks cannot be relied on: a role must be one of these
# or one the template tests for by name (Llama 3's "ipython"), which it then knows how to render.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# `message['role'] == 'x'`, `message.role != "x"` and `role in ['x', 'y']` in a template.
_ROLE_IS = re.compile(r"""role['"\]]*\s*[!=]=\s*['"]([\w-]+)['"]""")
_ROLE_IN = re.compile(r"""role['"\]]*\s+(?:not\s+)?in\s*[\[(]([^\])]*)""")
_QUOTED = re.compile(r"""['"]([\w-]+)['"]""")


def template_roles(template: str) -> frozenset[str]:
    """The role names a chat template's source compares a role with."""
    listed = (name for group in _ROLE_IN.findall(template) for name in _QUOTED.findall(group))
    return frozenset([*_ROLE_IS.findall(template), *listed])


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF = _byte_level_alphabet()


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
        self.chat_roles = CHAT_ROLES | template_roles(template) if template else CHAT_ROLES
        self._byte_level = isinstance(tokenizer.decoder, ByteLevel)
        self._token_bytes: dict[int, bytes] = {}
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

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (a byte-level token can hold part of a character)."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if self._byte_level and all(c in BYTE_OF for c in piece):
                raw = bytes(BYTE_OF[c] for c in piece)
            else:
                raw = self.decode([token_id], skip_special_tokens=False).encode()
            self._token_bytes[token_id] = raw  # at most the vocabulary
        return raw

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, field: str = "messages") -> str:
        """`field` names the message list in errors ("start.chat.messages", "messages")."""
        if self._template is None:
            raise invalid(field, f"the model at {self.source} has no chat template; send text or token_ids")
        for i, m in enumerate(messages):
            role = m.get("role")
            if not role:
                raise invalid(f"{field}[{i}].role", "must not be empty")
            if role not in self.chat_roles:
                raise invalid(f"{field}[{i}].role", f"{quoted(role)} is not a role this model's chat template takes: "
                                                             f"one of {', '.join(sorted(self.chat_roles))}")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise invalid(field, f"the chat template rejected the messages: {e}") from None

    def encode_chat(self, messages: list[dict], field: str = "messages") -> list[int]:
        # The template already holds every special token the model expects.
        return self.encode(self.render_chat(messages, field=field), add_special_tokens=False)

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
