"""User-facing errors: one line of cause, one line of remedy; the CLI prints them without a traceback."""
from __future__ import annotations

import difflib


class CilbenchError(Exception):
    """An error the user can fix. ``remedy`` says how."""

    def __init__(self, cause: str, remedy: str = ""):
        super().__init__(cause)
        self.cause = cause
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.cause}\n  -> {self.remedy}" if self.remedy else self.cause


class ConfigError(CilbenchError):
    pass


class DataError(CilbenchError):
    pass


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """'did you mean' text for an unknown name."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}known: {', '.join(sorted(choices))}"
