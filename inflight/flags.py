"""Command-line flags and environment variables from config dataclasses, defined once.

A field `kv_cache.tokens_per_block` becomes the flag `--kv-cache-tokens-per-block` and
the variable `INFLIGHT_KV_CACHE_TOKENS_PER_BLOCK`; a flag beats the variable, which
beats the dataclass default. A field's `metadata={"help": ...}` is its help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any


def _fields(cls, prefix: str = "", flag_prefix: str = ""):
    """(attribute path, flag path, field, type) of every leaf field; a nested dataclass
    field with metadata {"flatten": True} lends its fields without its own name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub_flag = flag_prefix if f.metadata.get("flatten") else f"{flag_prefix}{f.name}."
            yield from _fields(tp, f"{prefix}{f.name}.", sub_flag)
        else:
            yield f"{prefix}{f.name}", f"{flag_prefix}{f.name}", f, tp


def _option(flag: str) -> str:
    """A field's flag path as its command-line option: kv_cache.tokens_per_block -> --kv-cache-tokens-per-block."""
    return "--" + flag.replace(".", "-").replace("_", "-")


def _env(flag: str) -> str:
    """A field's flag path as its environment variable: INFLIGHT_KV_CACHE_TOKENS_PER_BLOCK."""
    return "INFLIGHT_" + flag.replace(".", "_").upper()


def _parser_for(tp) -> tuple[Any, list | None]:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Literal:
        return str, list(typing.get_args(tp))
    if origin is not None and args:  # Optional[X] / X | None
        return _parser_for(args[0])
    if tp is bool:
        return _parse_bool, None
    return tp, None


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_config_flags(parser: argparse.ArgumentParser, cls, title: str | None = None, exclude: frozenset[str] = frozenset(),
                     description: str | None = None) -> None:
    """A flag for each of cls's fields but those whose attribute path is in `exclude`."""
    group = parser.add_argument_group(title or cls.__name__, description)
    defaults = cls()
    for path, flag, f, tp in _fields(cls):
        if path in exclude:
            continue
        conv, choices = _parser_for(tp)
        default = defaults
        for part in path.split("."):
            default = getattr(default, part)
        env = _env(flag)
        help_text = f.metadata.get("help", "")
        group.add_argument(
            _option(flag),
            dest=path,
            type=conv,
            choices=choices,
            default=argparse.SUPPRESS,
            metavar=None if choices else path.rsplit(".", 1)[-1].upper(),
            help=f"{help_text} (default: {default}; env {env})".strip(),
        )


def config_from_args(cls, args: argparse.Namespace):
    """Build cls from flags, then INFLIGHT_* variables, then its defaults."""
    cfg = cls()
    given = vars(args)
    for path, flag, f, tp in _fields(cls):
        env = _env(flag)
        if path in given:
            value = given[path]
        elif env in os.environ:
            conv, choices = _parser_for(tp)
            raw = os.environ[env]
            try:
                value = conv(raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"error: {env}={raw!r}: {e}") from None
            if choices and value not in choices:
                raise SystemExit(f"error: {env}={raw!r}: choose from {choices}")
        else:
            continue
        target = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return cfg


def given_argv(cls, args: argparse.Namespace, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The flags of cls's fields that were given on the command line (add_config_flags
    leaves the others out of `args`), as arguments for another command that takes them:
    how `inflight serve` hands its worker flags to each worker."""
    given = vars(args)
    argv = []
    for path, flag, f, tp in _fields(cls):
        if path in given and path not in exclude:
            value = given[path]
            argv += [_option(flag), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv
