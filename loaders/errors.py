"""The two exceptions every part of the pack raises: a user-facing error, and a cancelled run."""

from __future__ import annotations


class Interrupted(Exception):
    """Raised when the user cancels a run (ComfyUI's own exception is used inside ComfyUI)."""


class LetterpressError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""
