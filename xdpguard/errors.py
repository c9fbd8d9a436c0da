"""Errors a user can cause and fix; the CLI prints them as one line."""

from __future__ import annotations


class XdpguardError(Exception):
    """A problem stated for the operator: what is wrong and, where known, what to do.

    ``detail``: a long text behind the one line (a verifier's log), shown
    with ``-v`` or as one field of the JSON log, never before the line."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail
