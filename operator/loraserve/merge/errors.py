"""The one error of the live merge."""

from __future__ import annotations


class MergeRefused(ValueError):
    """The adapter cannot be merged exactly (or the base is not the pinned one); the message names what."""
