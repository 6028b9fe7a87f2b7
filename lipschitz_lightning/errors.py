"""Errors a user can fix: the commands print them as one line, without a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class LipschitzLightningError(Exception):
    """Base of the errors whose message alone tells the user what to change."""


class ConfigError(LipschitzLightningError, ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


class DataError(LipschitzLightningError, RuntimeError):
    """Data is missing, unreadable or inconsistent; the message names the file and the fixes."""


class TrainingDiverged(LipschitzLightningError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


def one_line(error: BaseException) -> str:
    """``error: <message>`` on one line, even where the message quotes a library's multi-line error."""
    return "error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def exit_with(error: BaseException, status: int = 1) -> NoReturn:
    """How every command ends on a user's error: ``one_line(error)`` on stderr, exit ``status``."""
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(status)
