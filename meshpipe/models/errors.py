"""Errors raised while finding, fetching or converting a model; messages are one user-facing line."""

from __future__ import annotations


class ModelError(Exception):
    """A model cannot be found, fetched, converted or loaded; the message says why, in one line."""


class GGUFError(ModelError):
    """A GGUF file is unreadable, truncated, or describes a model this converter does not handle."""
