"""The one error type users see.

Every message says *what* is wrong, *where* (file, column, value) and *how to fix it*; the CLI prints
it without a traceback (exit code 2). Validate at the edge, before any Ray work starts.
"""

from __future__ import annotations


class RnbError(Exception):
    """A problem the user can fix: bad input, bad setting, missing resource."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        parts = [what]
        if where:
            parts.append(f"(at {where})")
        msg = " ".join(parts)
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)
