"""Errors raised while locating, converting or loading model weights."""


class ModelError(Exception):
    """A model that cannot be used: a missing, unreadable or unsupported file. The message names the path."""
