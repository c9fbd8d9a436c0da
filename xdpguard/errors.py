"""Errors a user can cause and fix; the CLI prints them as one line."""

from __future__ import annotations


class XdpguardError(Exception):
    """A problem stated for the operator: what is wrong and, where known, what to do."""
