"""Errors a user can fix: the commands print them as one line, without a traceback."""

from __future__ import annotations

import argparse
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


class CertificateBroken(LipschitzLightningError):
    """An attack, a search or the data went past what the certificate guarantees: a bug, never a
    result (``certify`` and ``quantize`` exit with status 2)."""


class Preempted(LipschitzLightningError):
    """A SIGTERM stopped the run; a resumable checkpoint was saved. Exit status 128 + 15, as if the
    signal had ended the process, so that a scheduler reads the run as not completed."""

    exit_status = 143


def one_line(error: BaseException) -> str:
    """``error: <message>`` on one line, even where the message quotes a library's multi-line error."""
    return "error: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def exit_with(error: BaseException, status: int | None = None) -> NoReturn:
    """How every command ends on a user's error: ``one_line(error)`` on stderr, exit ``status``
    (default: the error's own ``exit_status``, else 1)."""
    status = getattr(error, "exit_status", 1) if status is None else status
    print(one_line(error), file=sys.stderr, flush=True)
    sys.exit(status)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as this project's one line ``error: ...`` and exit status 1."""

    def error(self, message: str):
        exit_with(ConfigError(f"{message} (see --help)"))
