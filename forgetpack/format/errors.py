"""The project's error types.

Every failure a user can cause (bad file, wrong base, bad name) is raised as a
``ForgetpackError`` so that the CLI can print one line and exit non-zero instead of a
traceback. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class ForgetpackError(Exception):
    """A user-facing error: its message is printed as one line by the CLI."""


class PatchError(ForgetpackError):
    """A patch file is unreadable, malformed, tampered with or does not fit its base."""


class CheckpointError(ForgetpackError):
    """A checkpoint file is unreadable or does not match what a patch expects."""


class SignatureError(PatchError):
    """A signature is missing, malformed or does not verify."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line: how a third-party failure is quoted in a ForgetpackError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
